"""Audit: pagination and idempotent retries across every RPC (README "Calling it", "Request
ids"; DESIGN invariant 2; rewards.proto GetRewardRequest.request_id).

What this file checks (the passing tests document behaviour that is right):

- every mutating RPC (the rows of test_idempotency_matrix, one fresh database each): ten
  copies of one request sent at once with asyncio.gather all get the same answer (GetReward:
  the same grant, ``existing`` aside), one request-id row is stored, and one more retry
  afterwards answers the same and changes no table;
- the same request id sent at once with two different payloads: one payload wins, every call
  with the other one is REQUEST_ID_REUSED, and only the winner's change is made;
- UploadCodes retried with the same bytes cut into other chunks (three at once) answers the
  first upload and adds nothing; other bytes under the id are REQUEST_ID_REUSED;
- a retry after the state moved on (the clearance closed, the campaign executed, the promotion
  deactivated, the object deleted) still gets the first answer and changes nothing;
- every List RPC: page_size 0 is the default, a huge page_size (2**31 - 1) is lowered to the
  maximum, a negative one is INVALID_PAGE_SIZE; tokens of other Lists, of other filters or
  parents, garbage, a 200 KB token and a deeply nested JSON token are INVALID_PAGE_TOKEN (never
  INTERNAL); a listing of exactly page_size items ends with an empty token; rows inserted
  and deleted between pages never make the rows that stay repeat or go missing.

Defects found and fixed (each test failed before the fix: server/rewards.py ``_denied`` now
looks for the request id's grant before answering any denial, the campaign's too):

1. GetReward with a campaign_id: the campaign eligibility check (server/rewards.py:176-182,
   storage/campaigns.py:192-214) runs before, and instead of, the request-id lookup. A
   request id already granted to customer A in an executed conditional campaign, sent again
   for customer B who was not approved, is answered as a NOT_ELIGIBLE denial instead of
   INVALID_ARGUMENT REQUEST_ID_REUSED (rewards.proto: "The same id with another customer ...
   is INVALID_ARGUMENT (REQUEST_ID_REUSED)"). The other denial path (server/rewards.py:187-196)
   did look for the existing grant first.
   test_get_reward_id_reused_for_an_unapproved_customer_is_request_id_reused

2. Same cause: a GetReward granted under a campaign_id that was only a grouping key (no
   campaign of that id existed) and retried after a campaign with that id was created gets
   NOT_ELIGIBLE ("campaign ... is SCHEDULED, not executed") instead of the first grant with
   ``existing: true``, although the grant stays live and charged (README "Request ids": "a
   GetReward retry ... gets the first grant back").
   test_get_reward_retry_gets_its_grant_after_a_campaign_takes_its_campaign_id
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest

from config.settings import ApiKeyConfig, Settings
from core.campaigns import EXECUTE_JOB_KIND, NOTIFY_JOB_KIND
from core.clock import FixedClock
from promo.v1 import campaigns_pb2 as campb
from promo.v1 import customers_pb2 as custpb
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import products_pb2 as prodpb
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import rewards_pb2 as rpb
from storage.db import create_pool
from tests.conftest import (
    TEST_API_KEYS,
    Api,
    Services,
    rpc_error_reason,
    serving_api,
    with_database,
)
from tests.database_factory import DatabaseFactory
from tests.e2e import test_idempotency_matrix as im
from tests.e2e import test_pagination_matrix as pm
from tests.e2e.campaign_helpers import create_campaign, set_statuses
from tests.e2e.code_helpers import code_promotion, codes_file, pool_counts, upload
from tests.e2e.promo_helpers import get_reward, promotion, reward_type
from workers import campaigns as _campaign_jobs  # noqa: F401  registers the campaign handlers
from workers.outbox import run_outbox_job


def rid() -> str:
    return f"audit-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def env(api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> pm.Env:
    return pm.Env(api=api, pool=pool, settings=settings, clock=clock)


async def refused(call: Any) -> tuple[str, str | None]:
    """(code, reason) of a call expected to fail; ("OK", None) when it did not."""
    try:
        await call
    except grpc.RpcError as exc:
        try:
            reason = rpc_error_reason(exc)
        except ValueError:
            reason = None
        return exc.code().name, reason  # type: ignore[union-attr]
    return "OK", None


# --- concurrent retries of every mutating RPC ----------------------------------------------------


@contextlib.asynccontextmanager
async def fresh_env(settings: Settings, services: Services,
                    factory: DatabaseFactory) -> AsyncIterator[im.Env]:
    """A database, pool and server of their own (the matrix's callers included)."""
    name = await asyncio.to_thread(factory.take)
    try:
        keys = [*TEST_API_KEYS, *(ApiKeyConfig(name=n, key=k, roles=[role])
                                  for role, (n, k) in im.OTHER_CALLERS.items())]
        url = with_database(services.database_url, name)
        own = settings.model_copy(update={"database_url": url, "api_keys": keys})
        db_pool = await create_pool(url, min_size=1, max_size=10)
        clock = FixedClock(datetime(2026, 11, 22, 10, 0, tzinfo=UTC))
        try:
            async with serving_api(own, db_pool, clock) as running:
                yield im.Env(api=running, pool=db_pool, clock=clock, settings=own)
        finally:
            await db_pool.close()
    finally:
        factory.give_back(name)


def _same_answer(rpc: str, body: bytes) -> bytes:
    """GetReward's retry differs from the first answer only in ``existing``."""
    if rpc == "RewardService/GetReward":
        answer = rpb.GetRewardResponse.FromString(body)
        answer.existing = False
        return answer.SerializeToString(deterministic=True)
    return body


async def test_ten_concurrent_retries_of_every_mutating_rpc_apply_once(
        settings: Settings, services: Services, database_factory: DatabaseFactory) -> None:
    problems: dict[str, object] = {}
    for row in im.ROWS:
        async with fresh_env(settings, services, database_factory) as env:
            request = await row.build(env)
            outcomes = await asyncio.gather(*(im._call(env, row.rpc, request, row.role)
                                              for _ in range(10)))
            failed = sorted({str(o) for o in outcomes if o.code != "OK"})
            answers = {_same_answer(row.rpc, o.body) for o in outcomes if o.code == "OK"}
            if failed or len(answers) != 1:
                problems[row.rpc] = (failed, f"{len(answers)} different answers")
                continue
            first = request[0] if isinstance(request, list) else request
            stored = await env.pool.fetchval(
                "SELECT count(*) FROM idempotency_keys WHERE request_id = $1",
                first.request_id)  # type: ignore[union-attr]
            if row.rpc == "RewardService/GetReward":  # its ids live in the grants
                stored = await env.pool.fetchval(
                    "SELECT count(*) FROM grants WHERE request_id = $1", first.request_id)
                if sum(rpb.GetRewardResponse.FromString(o.body).existing
                       for o in outcomes) != 9:
                    problems[row.rpc + " existing"] = "not 9 of 10 marked existing"
            if stored != 1:
                problems[row.rpc + " stored"] = stored
            before = await im._dump(env.pool)
            again = await im._call(env, row.rpc, request, row.role)
            if again.code != "OK" or {_same_answer(row.rpc, again.body)} != answers:
                problems[row.rpc + " retry"] = str(again)
            if diff := im._changed_tables(before, await im._dump(env.pool)):
                problems[row.rpc + " retry changed"] = diff
    assert problems == {}


async def test_one_id_with_two_payloads_at_once_applies_one_and_refuses_the_other(
        api: Api, pool: asyncpg.Pool) -> None:
    stub = api.channel.unary_unary(
        "/promo.v1.RewardTypeService/CreateRewardType",
        request_serializer=rtpb.CreateRewardTypeRequest.SerializeToString,
        response_deserializer=rtpb.CreateRewardTypeResponse.FromString)
    request_id = rid()

    def make(name: str) -> rtpb.CreateRewardTypeRequest:
        return rtpb.CreateRewardTypeRequest(request_id=request_id, reward_type=rtpb.RewardType(
            name=name, display_name=name.title(), category=rtpb.REWARD_CATEGORY_UNITS))

    calls = [make("spins" if i % 2 else "gems") for i in range(10)]

    async def send(request: rtpb.CreateRewardTypeRequest) -> tuple[str, str]:
        try:
            answer = await stub(request, metadata=api.key())
        except grpc.RpcError as exc:
            return request.reward_type.name, f"{exc.code().name} {rpc_error_reason(exc)}"
        return request.reward_type.name, f"OK {answer.reward_type.name}"

    results = await asyncio.gather(*(send(c) for c in calls))
    names = [r["name"] for r in await pool.fetch("SELECT name FROM reward_types")]
    assert len(names) == 1
    [winner] = names
    [loser] = {"spins", "gems"} - {winner}
    assert sorted(results) == sorted(
        [(winner, f"OK {winner}")] * 5 + [(loser, "INVALID_ARGUMENT REQUEST_ID_REUSED")] * 5)


# --- retries after the state moved on -----------------------------------------------------------


async def run_campaign_jobs(env: pm.Env) -> None:
    ctx = {"pool": env.pool, "clock": env.clock, "settings": env.settings}
    for _ in range(3):
        ids = [r["id"] for r in await env.pool.fetch(
            """SELECT id FROM outbox_jobs WHERE kind = ANY($1::text[]) AND status = 'pending'
                  AND due_at <= $2 ORDER BY id""",
            [NOTIFY_JOB_KIND, EXECUTE_JOB_KIND], env.clock.now())]
        for job_id in ids:
            await run_outbox_job(ctx, job_id)


async def executed_campaign(env: pm.Env, campaign_id: str, approved: dict[str, bool]) -> None:
    await create_campaign(env.api, campaign_id, env.clock.now() + timedelta(hours=2),
                          customers=sorted(approved))
    await set_statuses(env.api, campaign_id, approved, rid())
    env.clock.advance(timedelta(hours=3))
    await run_campaign_jobs(env)
    campaign = await pm.call_any(env.api, "promo.v1.CampaignService", "GetCampaign",
                                 campb.GetCampaignRequest(campaign_id=campaign_id),
                                 campb.GetCampaignResponse)
    assert campaign.campaign.status == campb.CAMPAIGN_STATUS_EXECUTED


async def test_clearance_calls_retried_after_execution_get_their_first_answers(
        env: pm.Env) -> None:
    await reward_type(env.api)
    await promotion(env.api, "VIP25")
    await create_campaign(env.api, "camp-1", env.clock.now() + timedelta(hours=2),
                          customers=["c1", "c2"])
    add = campb.AddCampaignTargetsRequest(request_id=rid(), campaign_id="camp-1",
                                          customer_ids=["c3"])
    first_add = await pm.call_any(env.api, "promo.v1.CampaignService", "AddCampaignTargets",
                                  add, campb.AddCampaignTargetsResponse)
    first_status = await set_statuses(env.api, "camp-1", {"c1": True, "c3": False}, "st-1")
    env.clock.advance(timedelta(hours=3))
    await run_campaign_jobs(env)
    before = await im._dump(env.pool)
    assert await set_statuses(env.api, "camp-1", {"c1": True, "c3": False}, "st-1") \
        == first_status
    assert await pm.call_any(env.api, "promo.v1.CampaignService", "AddCampaignTargets", add,
                             campb.AddCampaignTargetsResponse) == first_add
    assert im._changed_tables(before, await im._dump(env.pool)) == {}
    # A new id for the closed clearance is refused, not silently accepted.
    code, _ = await refused(set_statuses(env.api, "camp-1", {"c2": True}, "st-2"))
    assert code == "FAILED_PRECONDITION"


async def test_deletes_and_unregistrations_retried_get_their_first_answers(
        env: pm.Env) -> None:
    await pm.personalized(env, "coffee", "Coffee")
    delete = prodpb.DeletePersonalizedPromotionRequest(request_id=rid(), backend_id="coffee")
    first = await pm.call_any(env.api, "promo.v1.ProductPromotionService",
                              "DeletePersonalizedPromotion", delete,
                              prodpb.DeletePersonalizedPromotionResponse)
    listener_id = await pm.register(env, 1, lpb.EVENT_TYPE_BONUS_ISSUED)
    unregister = lpb.UnregisterListenerRequest(request_id=rid(), listener_id=listener_id)
    gone = await pm.call_any(env.api, "promo.v1.ListenerService", "UnregisterListener",
                             unregister, lpb.UnregisterListenerResponse)
    before = await im._dump(env.pool)
    for _ in range(2):
        assert await pm.call_any(env.api, "promo.v1.ProductPromotionService",
                                 "DeletePersonalizedPromotion", delete,
                                 prodpb.DeletePersonalizedPromotionResponse) == first
        assert await pm.call_any(env.api, "promo.v1.ListenerService", "UnregisterListener",
                                 unregister, lpb.UnregisterListenerResponse) == gone
    assert im._changed_tables(before, await im._dump(env.pool)) == {}
    # A new id is a new request: the object is gone now.
    code, _ = await refused(pm.call_any(
        env.api, "promo.v1.ProductPromotionService", "DeletePersonalizedPromotion",
        prodpb.DeletePersonalizedPromotionRequest(request_id=rid(), backend_id="coffee"),
        prodpb.DeletePersonalizedPromotionResponse))
    assert code == "NOT_FOUND"


async def test_get_reward_retry_after_deactivation_gets_the_first_grant(env: pm.Env) -> None:
    await reward_type(env.api)
    await promotion(env.api, "VIP25")
    first = await get_reward(env.api, "c1", request_id="gr-1")
    await pm.call_any(env.api, "promo.v1.PromotionService", "DeactivatePromotion",
                      ppb.DeactivatePromotionRequest(request_id=rid(), promotion_code="VIP25"),
                      ppb.DeactivatePromotionResponse)
    again = await get_reward(env.api, "c1", request_id="gr-1")
    assert again.existing and again.grant == first.grant
    code, reason = await refused(get_reward(env.api, "c2", request_id="gr-1"))
    assert (code, reason) == ("INVALID_ARGUMENT", "REQUEST_ID_REUSED")


async def test_get_reward_retry_in_an_executed_campaign_gets_the_first_grant(
        env: pm.Env) -> None:
    await reward_type(env.api)
    await promotion(env.api, "VIP25")
    await executed_campaign(env, "camp-1", {"c1": True, "c2": False})
    first = await get_reward(env.api, "c1", request_id="gr-1", campaign_id="camp-1")
    assert first.HasField("grant")
    again = await get_reward(env.api, "c1", request_id="gr-1", campaign_id="camp-1")
    assert again.existing and again.grant == first.grant


async def test_get_reward_id_reused_for_an_unapproved_customer_is_request_id_reused(
        env: pm.Env) -> None:
    await reward_type(env.api)
    await promotion(env.api, "VIP25")
    await executed_campaign(env, "camp-1", {"c1": True, "c2": False})
    first = await get_reward(env.api, "c1", request_id="gr-1", campaign_id="camp-1")
    assert first.HasField("grant")
    # The same id for a customer of the same campaign with a fresh customer id that *was*
    # approved would be REQUEST_ID_REUSED; for c2 (not approved) it must be too.
    code, reason = await refused(get_reward(env.api, "c2", request_id="gr-1",
                                            campaign_id="camp-1"))
    assert (code, reason) == ("INVALID_ARGUMENT", "REQUEST_ID_REUSED")


async def test_get_reward_retry_gets_its_grant_after_a_campaign_takes_its_campaign_id(
        env: pm.Env) -> None:
    await reward_type(env.api)
    await promotion(env.api, "VIP25")
    # "summer" names no campaign: it is only a grouping key (storage/campaigns.py eligibility).
    first = await get_reward(env.api, "c1", request_id="gr-1", campaign_id="summer")
    assert first.HasField("grant")
    await create_campaign(env.api, "summer", env.clock.now() + timedelta(days=1),
                          customers=["c1"])
    again = await get_reward(env.api, "c1", request_id="gr-1", campaign_id="summer")
    assert again.denial_reason == rpb.DENIAL_REASON_UNSPECIFIED, again.denial_message
    assert again.existing and again.grant == first.grant


# --- pagination -------------------------------------------------------------------------------


async def list_parents(env: pm.Env) -> dict[str, dict[str, Any]]:
    """Request fields naming a real parent for the Lists that need one."""
    await reward_type(env.api)
    await promotion(env.api, "VIP25")
    await pm.upsert_customers(env, ["x1"])
    await pm.create_campaign(env, "x1", customers=["c1", "c2"], conditional=True,
                             execute_in=timedelta(days=2))
    await pm.personalized(env, "x1", "X1")
    return {rpc: dict(fields) for rpc, fields in pm.PLACEHOLDERS.items()}


async def test_page_size_zero_huge_and_negative_on_every_list(env: pm.Env) -> None:
    parents = await list_parents(env)
    problems: dict[str, object] = {}
    for rpc in sorted(pm.METHODS):
        base = parents.get(rpc, {})
        for size in (0, 1000, 2**31 - 1):
            try:
                response = await pm.call(env.api, rpc, **base, page_size=size)
            except grpc.RpcError as exc:
                problems[f"{rpc} page_size={size}"] = exc.code().name
                continue
            if response.next_page_token:
                problems[f"{rpc} page_size={size}"] = "a token on the only page"
        for size in (-1, -(2**31)):
            outcome = await refused(pm.call(env.api, rpc, **base, page_size=size))
            if outcome != ("INVALID_ARGUMENT", "INVALID_PAGE_SIZE"):
                problems[f"{rpc} page_size={size}"] = outcome
    assert problems == {}


async def test_tokens_of_other_lists_filters_and_garbage_are_invalid_page_token(
        env: pm.Env) -> None:
    parents = await list_parents(env)
    await reward_type(env.api, "spins")
    await pm.upsert_customers(env, ["x2", "x3"])
    await pm.create_campaign(env, "x2", customers=["c1", "c2"], conditional=True,
                             execute_in=timedelta(days=2))
    for i in range(2):
        await pm.register(env, i, lpb.EVENT_TYPE_BONUS_ISSUED)
    tokens = {}
    for rpc, base in (("ListRewardTypes", {}), ("ListCustomers", {}), ("ListListeners", {}),
                      ("GetProcessedCampaignCustomers", {"campaign_id": "x1"})):
        response = await pm.call(env.api, rpc, **base, page_size=1)
        assert response.next_page_token, rpc
        tokens[rpc] = response.next_page_token
    nested = base64.urlsafe_b64encode(("[" * 100_000 + "]" * 100_000).encode()).decode()
    garbage = {"junk": "%%%not-a-token", "huge": "A" * 200_000, "nested": nested,
               "json": base64.urlsafe_b64encode(json.dumps(
                   {"a": [1], "f": "x", "c": "y"}).encode()).decode().rstrip("=")}
    problems: dict[str, object] = {}
    for rpc in sorted(pm.METHODS):
        base = parents.get(rpc, {})
        for source, token in [*tokens.items(), *garbage.items()]:
            if source == rpc:
                continue
            outcome = await refused(pm.call(env.api, rpc, **base, page_size=1,
                                            page_token=token))
            if outcome != ("INVALID_ARGUMENT", "INVALID_PAGE_TOKEN"):
                problems[f"{source} -> {rpc}"] = outcome
    # The same List with another parent or other filters.
    other_filters = [
        ("GetProcessedCampaignCustomers", {"campaign_id": "x2"}),
        ("ListListeners", {"event_type": lpb.EVENT_TYPE_BONUS_ISSUED}),
    ]
    for rpc, fields in other_filters:
        outcome = await refused(pm.call(env.api, rpc, **fields, page_size=1,
                                        page_token=tokens[rpc]))
        if outcome != ("INVALID_ARGUMENT", "INVALID_PAGE_TOKEN"):
            problems[f"{rpc} other filters"] = outcome
    assert problems == {}


ID_OF: dict[str, Any] = {
    "ListCustomers": lambda c: c.customer_id,
    "ListPersonalizedPromotions": lambda p: p.backend_id,
    "ListListeners": lambda listener: str(listener.listener_id),
    "ListCustomerEvents": lambda e: e.external_id,
    "ListRewardTypes": lambda t: t.name,
}


async def walk_all(env: pm.Env, rpc: str, fields: dict[str, Any], size: int,
                   between: Any = None) -> tuple[list[str], list[str]]:
    """Every id of a listing in pages of ``size`` (``between(page_number)`` runs after each
    page), and the tokens."""
    ids: list[str] = []
    tokens: list[str] = []
    token = ""
    for number in range(100):
        response = await pm.call(env.api, rpc, **fields, page_size=size, page_token=token)
        ids += [ID_OF[rpc](item) for item in pm.items_of(rpc, response)]
        token = response.next_page_token
        tokens.append(token)
        if not token:
            return ids, tokens
        if between is not None:
            await between(number)
    raise AssertionError("no last page")




async def test_exactly_a_page_ends_with_an_empty_token(env: pm.Env) -> None:
    await pm.upsert_customers(env, [f"cu{i}" for i in range(6)])
    for size in (2, 3, 6):
        ids, tokens = await walk_all(env, "ListCustomers", {}, size)
        assert ids == [f"cu{i}" for i in range(6)]
        assert len(tokens) == 6 // size and tokens[-1] == ""


async def test_personalized_promotions_deleted_and_created_between_pages(
        env: pm.Env) -> None:
    names = [f"pp{i:02d}" for i in range(12)]
    for name in names:
        await pm.personalized(env, name, name.upper())
    deleted: list[str] = []
    added = ["pp00a", "pp05a", "pp11a", "pp99"]

    async def churn(number: int) -> None:
        if number == 0:  # behind the cursor, ahead of it, and at its very next row
            for gone in ("pp01", "pp07", "pp03"):
                await pm.delete_personalized(env, gone)
                deleted.append(gone)
            for name in added:
                await pm.personalized(env, name, name.upper())

    ids, _ = await walk_all(env, "ListPersonalizedPromotions", {}, 3, churn)
    assert len(ids) == len(set(ids))
    stayed = [n for n in names if n not in deleted]
    assert [i for i in ids if i in stayed] == stayed
    assert not set(ids) & set(deleted[1:])  # deleted before their page was read
    assert set(ids) >= {"pp05a", "pp11a", "pp99"}  # created ahead of the cursor


async def test_listeners_and_events_inserted_and_deleted_between_pages(env: pm.Env) -> None:
    listener_ids = [await pm.register(env, i, lpb.EVENT_TYPE_BONUS_ISSUED) for i in range(8)]
    gone: list[int] = []

    async def churn(number: int) -> None:
        if number == 0:
            # One already listed (on this page), one ahead of the cursor.
            gone.extend([listener_ids[2], listener_ids[6]])
            for listener_id in gone:
                await pm.unregister(env, listener_id)
            listener_ids.append(await pm.register(env, 50, lpb.EVENT_TYPE_BONUS_ISSUED))

    ids, _ = await walk_all(env, "ListListeners", {}, 3, churn)
    assert ids == [str(i) for i in listener_ids if i != gone[1]]

    await pm.upsert_customers(env, ["c1"])
    start = env.clock.now() - timedelta(days=1)
    await pm.record_events(env, [(f"e{i:02d}", "c1", "deposit", start + timedelta(minutes=i))
                                 for i in range(10)])

    async def more(number: int) -> None:
        if number == 0:  # one newer than every page, one in the middle, one older than all
            await pm.record_events(env, [
                ("new", "c1", "deposit", start + timedelta(hours=1)),
                ("mid", "c1", "deposit", start + timedelta(minutes=4, seconds=30)),
                ("old", "c1", "deposit", start - timedelta(hours=1))])

    events, _ = await walk_all(env, "ListCustomerEvents", {"customer_id": "c1"}, 4, more)
    assert len(events) == len(set(events))
    assert [e for e in events if e.startswith("e")] == [f"e{i:02d}" for i in range(9, -1, -1)]
    assert "new" not in events and {"mid", "old"} <= set(events)
    assert events.index("mid") == events.index("e04") - 1  # newest first


async def test_events_token_for_another_customer_or_kinds_is_refused(env: pm.Env) -> None:
    await pm.upsert_customers(env, ["c1", "c2"])
    when = env.clock.now() - timedelta(hours=1)
    await pm.record_events(env, [(f"e{i}", c, "deposit", when + timedelta(minutes=i))
                                 for i, c in enumerate(["c1", "c1", "c1", "c2", "c2"])])
    response = await pm.call(env.api, "ListCustomerEvents", customer_id="c1", page_size=1)
    token = response.next_page_token
    for fields in ({"customer_id": "c2"}, {"customer_id": "c1", "kinds": ["deposit"]},
                   {"customer_id": "nobody"}):
        assert await refused(pm.call(env.api, "ListCustomerEvents", **fields,
                                     page_token=token)) == (
            "INVALID_ARGUMENT", "INVALID_PAGE_TOKEN"), fields
    # Unknown customers are NOT_FOUND on the first page, not an empty listing.
    assert (await refused(pm.call(env.api, "ListCustomerEvents", customer_id="nobody")))[0] \
        == "NOT_FOUND"


async def test_upsert_retry_after_a_newer_upsert_changes_nothing(env: pm.Env) -> None:
    """A late retry must not put the old data back over a newer request's change."""
    first = custpb.UpsertCustomersRequest(request_id=rid(), customers=[
        custpb.Customer(customer_id="c1", currency="EUR", time_zone="UTC")])
    await pm.call_any(env.api, "promo.v1.CustomerService", "UpsertCustomers", first,
                      custpb.UpsertCustomersResponse)
    await pm.call_any(env.api, "promo.v1.CustomerService", "UpsertCustomers",
                      custpb.UpsertCustomersRequest(request_id=rid(), customers=[
                          custpb.Customer(customer_id="c1", currency="USD", time_zone="UTC")]),
                      custpb.UpsertCustomersResponse)
    await pm.call_any(env.api, "promo.v1.CustomerService", "UpsertCustomers", first,
                      custpb.UpsertCustomersResponse)
    customer = await pm.call_any(env.api, "promo.v1.CustomerService", "GetCustomer",
                                 custpb.GetCustomerRequest(customer_id="c1"),
                                 custpb.GetCustomerResponse)
    assert customer.customer.currency == "USD"


async def test_upload_retried_in_other_chunks_answers_first_and_other_bytes_are_refused(
        env: pm.Env) -> None:
    await code_promotion(env.api, "FLASH")
    data = codes_file("FLASH", 50)
    first = await upload(env.api, "FLASH", data, "up-1", chunk=100)
    before = await im._dump(env.pool)
    again = await asyncio.gather(*(upload(env.api, "FLASH", data, "up-1", chunk=size)
                                   for size in (7, 100, 64 * 1024)))
    assert all(answer == first for answer in again)
    assert im._changed_tables(before, await im._dump(env.pool)) == {}
    assert await refused(upload(env.api, "FLASH", codes_file("FLASH", 51), "up-1")) == (
        "INVALID_ARGUMENT", "REQUEST_ID_REUSED")
    assert await pool_counts(env.pool, "FLASH") == (50, 0, 50)
