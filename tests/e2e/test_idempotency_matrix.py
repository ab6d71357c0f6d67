"""The request-id contract (README "Calling it", DESIGN.md invariant 2 and "Contract style")
checked on every mutating RPC of every service, found from the generated descriptors (an RPC
is mutating when its request has a ``request_id`` field).

For each RPC a minimal valid request is built (with whatever it needs set up first), then:

1. the first call is OK;
2. the same id and the same request again: the first answer, byte for byte
   (``SerializeToString(deterministic=True)``), and no table changes (a full dump of every
   table of the database is compared);
3. the same id with a changed field: INVALID_ARGUMENT REQUEST_ID_REUSED, nothing changes;
4. the same id and the same request from another caller (another configured key name with the
   same role): REQUEST_ID_REUSED, nothing changes;
5. no request_id: INVALID_ARGUMENT (INVALID_REQUEST_ID), nothing changes;

and last the retry of (2) again two days later (past the campaign's execute_at, the batching
window, the day's caps): still the first answer, and nothing changes. Every step is compared
with the dump taken after the step before, so a change is reported once, by its step.

GetReward follows its own documented rules (README "Request ids", rewards.proto): a retry gets
the first grant back with ``existing: true`` (the only difference from the first answer), and
its stored answer is the customer's grant, answered to any runtime caller.

UploadCodes is a client stream: its request id travels in the first message; its row sends the
file in two messages. Every check of one RPC runs in one test, and every broken check is
reported (not only the first).
"""

from __future__ import annotations

import importlib
import pkgutil
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from google.protobuf.message import Message

import promo.v1 as promo_v1
from config.settings import ApiKeyConfig, Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import campaigns_pb2 as campb
from promo.v1 import codes_pb2 as codepb
from promo.v1 import customers_pb2 as custpb
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import products_pb2 as prodpb
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import rewards_pb2 as rpb
from storage import webhooks as webhooks_repo
from tests.conftest import TEST_API_KEYS, Api, rpc_error_reason, serving_api
from tests.e2e import test_bonuses_api as bonus_api
from tests.e2e import test_products_api as product_api
from tests.e2e.campaign_helpers import create_campaign, set_statuses, ts
from tests.e2e.code_helpers import code_promotion, codes_file
from tests.e2e.promo_helpers import get_reward, promotion, reward_type, single

# A second configured caller (another key name) for each role: (name, plain key).
OTHER_CALLERS = {role: (f"matrix-{role}-2", f"matrix-{role}-key-2-0123456789abcdef")
                 for role in ("admin", "runtime", "listener")}

Request = Message | list[Message]  # a client stream is a list of messages


@dataclass
class Env:
    api: Api
    pool: asyncpg.Pool
    clock: FixedClock
    settings: Settings
    found: dict[str, Any] = field(default_factory=dict)  # what a set-up made, for the changes


@pytest.fixture
async def env(settings: Settings, pool: asyncpg.Pool,
              clock: FixedClock) -> AsyncIterator[Env]:
    """A real server whose callers include a second key name for every role."""
    keys = [*TEST_API_KEYS, *(ApiKeyConfig(name=name, key=key, roles=[role])
                              for role, (name, key) in OTHER_CALLERS.items())]
    async with serving_api(settings.model_copy(update={"api_keys": keys}), pool,
                           clock) as running:
        yield Env(api=running, pool=pool, clock=clock, settings=settings)


# --- the descriptors ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Rpc:
    path: str  # "/promo.v1.RewardTypeService/CreateRewardType"
    request_type: Any
    response_type: Any
    client_streaming: bool


def _rpcs() -> dict[str, Rpc]:
    """Every RPC of every service of every generated promo.v1 module, by "Service/Method"."""
    found: dict[str, Rpc] = {}
    for info in pkgutil.iter_modules(promo_v1.__path__):
        if not info.name.endswith("_pb2"):
            continue
        module = importlib.import_module(f"promo.v1.{info.name}")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                found[f"{service.name}/{method.name}"] = Rpc(
                    path=f"/{service.full_name}/{method.name}",
                    request_type=getattr(module, method.input_type.name),
                    response_type=getattr(module, method.output_type.name),
                    client_streaming=method.client_streaming)
    return found


RPCS = _rpcs()
MUTATING = sorted(name for name, rpc in RPCS.items()
                  if "request_id" in rpc.request_type.DESCRIPTOR.fields_by_name)


# --- calling and observing ---------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    code: str
    reason: str | None = None
    details: str = ""
    body: bytes = b""  # the response, serialized deterministically

    def __str__(self) -> str:
        return f"{self.code} {self.reason} {self.details!r}"


def _metadata(role: str, other: bool) -> tuple[tuple[str, str], ...]:
    if other:
        return (("x-api-key", OTHER_CALLERS[role][1]),)
    return Api.key(role)


async def _call(env: Env, name: str, request: Request, role: str, *,
                other: bool = False) -> Outcome:
    rpc = RPCS[name]
    metadata = _metadata(role, other)
    try:
        if rpc.client_streaming:
            assert isinstance(request, list)
            stream = env.api.channel.stream_unary(
                rpc.path, request_serializer=rpc.request_type.SerializeToString,
                response_deserializer=rpc.response_type.FromString)

            async def messages() -> AsyncIterator[Message]:
                for message in request:
                    yield message

            response = await stream(messages(), metadata=metadata)
        else:
            unary = env.api.channel.unary_unary(
                rpc.path, request_serializer=rpc.request_type.SerializeToString,
                response_deserializer=rpc.response_type.FromString)
            response = await unary(request, metadata=metadata)
    except grpc.RpcError as exc:
        try:
            reason = rpc_error_reason(exc)
        except ValueError:
            reason = None
        return Outcome(exc.code().name, reason, exc.details() or "")  # type: ignore[union-attr]
    return Outcome("OK", body=response.SerializeToString(deterministic=True))


async def _dump(pool: asyncpg.Pool) -> dict[str, list[str]]:
    """Every row of every table of the test's database, as JSON text, sorted per table."""
    async with pool.acquire() as conn:
        tables = [r["tablename"] for r in await conn.fetch(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public' ORDER BY 1")]
        return {table: sorted(r[0] for r in await conn.fetch(
            f'SELECT to_jsonb(t)::text FROM "{table}" t')) for table in tables}


def _changed_tables(before: dict[str, list[str]], after: dict[str, list[str]]) -> dict[str, str]:
    return {table: f"{len(before.get(table, []))} -> {len(after.get(table, []))} rows"
            + ("" if len(before.get(table, [])) != len(after.get(table, []))
               else " (contents changed)")
            for table in sorted(set(before) | set(after))
            if before.get(table) != after.get(table)}


def _clone(request: Request) -> Request:
    if isinstance(request, list):
        return [_clone(m) for m in request]  # type: ignore[misc]
    copy = type(request)()
    copy.CopyFrom(request)
    return copy


def _without_request_id(request: Request) -> Request:
    copy = _clone(request)
    first = copy[0] if isinstance(copy, list) else copy
    first.ClearField("request_id")  # type: ignore[arg-type]
    return copy


Change = Callable[[Request, Env], Request]


def edit(fn: Callable[[Any], object]) -> Change:
    """A change of the request: ``fn`` edits a copy (its result is ignored)."""
    def apply(request: Request, env: Env) -> Request:
        copy = _clone(request)
        fn(copy)
        return copy
    return apply


def mask(*paths: str) -> field_mask_pb2.FieldMask:
    return field_mask_pb2.FieldMask(paths=list(paths))


def rid() -> str:
    return f"matrix-{uuid.uuid4().hex[:12]}"


# --- set-ups -----------------------------------------------------------------------------------

async def _active_promotions(env: Env, *codes: str) -> None:
    await reward_type(env.api)
    for code in codes:
        await promotion(env.api, code)


async def _campaigns(env: Env, *ids: str) -> None:
    await _active_promotions(env, "VIP25")
    for campaign_id in ids:
        await create_campaign(env.api, campaign_id, env.clock.now() + timedelta(days=1),
                              customers=["c1", "c2"])


async def _listener(env: Env, url: str, event_type: int = lpb.EVENT_TYPE_BONUS_ISSUED) -> int:
    response = await lpb_grpc.ListenerServiceStub(env.api.channel).RegisterListener(
        lpb.RegisterListenerRequest(request_id=rid(), listener=lpb.Listener(
            event_type=event_type, url=url)), metadata=env.api.key())
    return int(response.listener.listener_id)


async def _failed_deliveries(env: Env, count: int) -> list[int]:
    """Finished (FAILED) deliveries of an active listener, as a worker would leave them."""
    await _listener(env, "https://hooks.example.com/campaigns",
                    lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN)
    async with env.pool.acquire() as conn, conn.transaction():
        for i in range(count):
            await webhooks_repo.emit_event(conn, event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN,
                                           now=env.clock.now(), payload={"campaign_id": f"c{i}"})
        await conn.execute("UPDATE webhook_deliveries SET status = 'FAILED', "
                           "last_error = 'HTTP 500', attempts = 1")
        await conn.execute("UPDATE outbox_jobs SET status = 'done'")
        return [r["id"] for r in await conn.fetch("SELECT id FROM webhook_deliveries ORDER BY id")]


async def _manual_bonus_results(env: Env) -> dict[str, bpb.BonusResult]:
    """Results of a MANUAL definition waiting for approval (m1, m2 CALCULATED)."""
    await bonus_api.create(env.api, bonus_api.definition(
        "manual-10", "sum(deposit.amount) * 10%", approval_mode=bpb.APPROVAL_MODE_MANUAL))
    await bonus_api.customers(env.api, ("m1", "EUR", "UTC"), ("m2", "EUR", "UTC"))
    now = env.clock.now()
    await bonus_api.events(env.api, "manual",
                           ("m1", "deposit", "250", now - timedelta(hours=2), {}),
                           ("m2", "deposit", "80", now - timedelta(hours=3), {}))
    await bonus_api.request(env.api, "manual-10", ["m1", "m2"], "manual-1", role="admin")
    env.clock.advance(timedelta(minutes=5))
    assert await bonus_api.run_due_batches(env.pool, env.settings, env.clock) == 1
    found = {r.customer_id: r for r in await bonus_api.results(env.api)}
    assert {c: r.status for c, r in found.items()} == {
        "m1": bpb.BONUS_STATUS_CALCULATED, "m2": bpb.BONUS_STATUS_CALCULATED}
    return found


async def _bonus_definition(env: Env, *ids: str) -> None:
    for definition_id in ids:
        await bonus_api.create(env.api, bonus_api.definition(definition_id,
                                                             bonus_api.LAST_DEPOSIT_50))


async def _bonus_rule(env: Env) -> None:
    await _bonus_definition(env, "bets-10")
    await bonus_api.rule(env.api, bpb.BonusRule(rule_id="each-bet", definition_id="bets-10",
                                                event_kind="bet", every=1))


def _schedule(schedule_id: str = "daily", local_time: str = "06:00") -> bpb.BonusSchedule:
    return bpb.BonusSchedule(schedule_id=schedule_id, definition_id="bets-10",
                             customer_ids=["z1"], local_time=local_time,
                             time_zone="Europe/Berlin")


async def _bonus_schedule(env: Env) -> None:
    await _bonus_definition(env, "bets-10")
    await bonus_api.customers(env.api, ("z1", "EUR", "UTC"))
    await bonus_api.stub(env.api).CreateBonusSchedule(bpb.CreateBonusScheduleRequest(
        request_id=rid(), schedule=_schedule()), metadata=env.api.key())


def _discount(discount_id: str = "breakfast") -> prodpb.ProductSetDiscount:
    return prodpb.ProductSetDiscount(
        discount_id=discount_id, name="Breakfast deal",
        discount_type=prodpb.DISCOUNT_TYPE_PERCENTAGE_OFF, value="50", product_sets=[
            prodpb.ProductSet(name="Breakfast basics", product_ids=["bread", "butter"],
                              required_quantity=2),
            prodpb.ProductSet(name="Your coffee", personalized_promotion_id="coffee",
                              required_quantity=1, gets_discount=True, discounted_quantity=1)])


async def _coffee_lists(env: Env, *customers: str) -> None:
    await product_api.customers(env.api, *customers)
    await product_api.personalized(env.api)
    await product_api.assign(env.api, list(customers), ["espresso", "latte"])


# --- the matrix --------------------------------------------------------------------------------

@dataclass(frozen=True)
class Row:
    rpc: str  # "Service/Method"
    role: str  # the caller's role (the RPC's own; admin where only admin may call it)
    build: Callable[[Env], Awaitable[Request]]  # sets up what it needs, returns the request
    changes: Sequence[tuple[str, Change]]
    # GetReward: a retry answers the first grant with existing: true, to any runtime caller.
    retry_existing: bool = False
    other_caller_replayed: bool = False

    def param(self) -> Any:
        return pytest.param(self, id=self.rpc.split("/")[1])


async def _b_create_reward_type(env: Env) -> Request:
    return rtpb.CreateRewardTypeRequest(request_id=rid(), reward_type=rtpb.RewardType(
        name="spins", display_name="Spins", category=rtpb.REWARD_CATEGORY_UNITS))


async def _b_update_reward_type(env: Env) -> Request:
    await reward_type(env.api)
    return rtpb.UpdateRewardTypeRequest(
        request_id=rid(), reward_type=rtpb.RewardType(name="cashback", display_name="Cash back"),
        update_mask=mask("display_name"))


async def _b_create_promotion(env: Env) -> Request:
    await reward_type(env.api)
    return ppb.CreatePromotionRequest(request_id=rid(), promotion=ppb.Promotion(
        promotion_code="VIP25", name="Promotion VIP25", rewards=[single()]))


async def _b_update_promotion(env: Env) -> Request:
    await reward_type(env.api)
    await promotion(env.api, "VIP25", activate=False)
    return ppb.UpdatePromotionRequest(
        request_id=rid(), promotion=ppb.Promotion(promotion_code="VIP25", name="Renamed"),
        update_mask=mask("name"))


async def _b_activate_promotion(env: Env) -> Request:
    await reward_type(env.api)
    await promotion(env.api, "VIP25", activate=False)
    await promotion(env.api, "VIP26", activate=False)
    return ppb.ActivatePromotionRequest(request_id=rid(), promotion_code="VIP25")


async def _b_deactivate_promotion(env: Env) -> Request:
    await _active_promotions(env, "VIP25", "VIP26")
    return ppb.DeactivatePromotionRequest(request_id=rid(), promotion_code="VIP25")


async def _b_get_reward(env: Env) -> Request:
    await reward_type(env.api)
    await reward_type(env.api, "credit")
    await promotion(env.api, "VIP25", rewards=[single(), ppb.PromotionReward(
        reward_type="credit", kind=ppb.REWARD_KIND_EXTERNAL)])
    return rpb.GetRewardRequest(request_id=rid(), promotion_code="VIP25", customer_id="c1",
                                external_values={"credit": "5"})


async def _b_revoke_grant(env: Env) -> Request:
    await _active_promotions(env, "VIP25")
    first = await get_reward(env.api, "c1")
    env.found["other"] = (await get_reward(env.api, "c2")).grant.grant_id
    return rpb.RevokeGrantRequest(request_id=rid(), grant_id=first.grant.grant_id,
                                  reason="credit failed")


def _other(path: str) -> Change:
    """A change naming the other resource the set-up made (env.found["other"])."""
    def apply(request: Request, env: Env) -> Request:
        copy = _clone(request)
        value = env.found["other"]
        if isinstance(value, list):
            del getattr(copy, path)[:]
            getattr(copy, path).extend(value)
        else:
            setattr(copy, path, value)
        return copy
    return apply


async def _b_upload_codes(env: Env) -> Request:
    await code_promotion(env.api, "FLASH")
    data = codes_file("FLASH", 4)
    return [codepb.UploadCodesRequest(promotion_code="FLASH", request_id=rid(), data=data[:26]),
            codepb.UploadCodesRequest(data=data[26:])]


async def _b_upsert_customers(env: Env) -> Request:
    return custpb.UpsertCustomersRequest(request_id=rid(), customers=[
        custpb.Customer(customer_id="c1", currency="EUR", time_zone="UTC")])


async def _b_record_events(env: Env) -> Request:
    await bonus_api.customers(env.api, ("c1", "EUR", "UTC"))
    return custpb.RecordEventsRequest(request_id=rid(), events=[custpb.Event(
        external_id="e-1", customer_id="c1", kind="deposit", amount="10", currency="EUR",
        occurred_at=ts(env.clock.now() - timedelta(hours=1)))])


async def _b_create_campaign(env: Env) -> Request:
    await _active_promotions(env, "VIP25")
    return campb.CreateCampaignRequest(
        request_id=rid(), customer_ids=["c1"], campaign=campb.Campaign(
            campaign_id="camp-1", name="Campaign 1",
            execute_at=ts(env.clock.now() + timedelta(days=1)), conditional_execution=True,
            promotion_codes=["VIP25"]))


async def _b_add_campaign_targets(env: Env) -> Request:
    await _campaigns(env, "camp-1")
    return campb.AddCampaignTargetsRequest(request_id=rid(), campaign_id="camp-1",
                                           customer_ids=["c3"])


async def _b_cancel_campaign(env: Env) -> Request:
    await _campaigns(env, "camp-1", "camp-2")
    return campb.CancelCampaignRequest(request_id=rid(), campaign_id="camp-1")


async def _b_update_customer_promotion_status(env: Env) -> Request:
    await _campaigns(env, "camp-1", "camp-2")
    return campb.UpdateCustomerPromotionStatusRequest(
        request_id=rid(), campaign_id="camp-1",
        statuses=[campb.CustomerPromotionStatus(customer_id="c1", approved=True)])


async def _b_register_listener(env: Env) -> Request:
    return lpb.RegisterListenerRequest(request_id=rid(), listener=lpb.Listener(
        event_type=lpb.EVENT_TYPE_BONUS_ISSUED, url="https://hooks.example.com/a"))


async def _b_update_listener(env: Env) -> Request:
    listener_id = await _listener(env, "https://hooks.example.com/a")
    return lpb.UpdateListenerRequest(
        request_id=rid(), listener=lpb.Listener(listener_id=listener_id, description="ops"),
        update_mask=mask("description"))


async def _b_unregister_listener(env: Env) -> Request:
    first = await _listener(env, "https://hooks.example.com/a")
    env.found["other"] = await _listener(env, "https://hooks.example.com/b")
    return lpb.UnregisterListenerRequest(request_id=rid(), listener_id=first)


async def _b_redeliver_event(env: Env) -> Request:
    first, env.found["other"] = await _failed_deliveries(env, 2)
    return lpb.RedeliverEventRequest(request_id=rid(), delivery_id=first)


async def _b_create_personalized_promotion(env: Env) -> Request:
    return prodpb.CreatePersonalizedPromotionRequest(
        request_id=rid(), personalized_promotion=prodpb.PersonalizedPromotion(
            backend_id="coffee", name="Your coffee"))


async def _b_update_personalized_promotion(env: Env) -> Request:
    await product_api.personalized(env.api)
    return prodpb.UpdatePersonalizedPromotionRequest(
        request_id=rid(), personalized_promotion=prodpb.PersonalizedPromotion(
            backend_id="coffee", name="Our coffee"), update_mask=mask("name"))


async def _b_delete_personalized_promotion(env: Env) -> Request:
    await product_api.personalized(env.api, "coffee")
    await product_api.personalized(env.api, "tea")
    return prodpb.DeletePersonalizedPromotionRequest(request_id=rid(), backend_id="coffee")


async def _b_assign_product_lists(env: Env) -> Request:
    await product_api.customers(env.api, "c1")
    await product_api.personalized(env.api)
    return prodpb.AssignProductListsRequest(
        request_id=rid(), personalized_promotion_id="coffee", customer_ids=["c1"],
        product_ids=["espresso", "latte"])


async def _b_remove_product_lists(env: Env) -> Request:
    await _coffee_lists(env, "c1", "c2")
    return prodpb.RemoveProductListsRequest(request_id=rid(), personalized_promotion_id="coffee",
                                            customer_ids=["c1"])


async def _b_create_product_set_discount(env: Env) -> Request:
    await product_api.personalized(env.api)
    return prodpb.CreateProductSetDiscountRequest(request_id=rid(),
                                                  product_set_discount=_discount())


async def _b_update_product_set_discount(env: Env) -> Request:
    await product_api.personalized(env.api)
    await product_api.breakfast_discount(env.api)
    return prodpb.UpdateProductSetDiscountRequest(
        request_id=rid(), product_set_discount=prodpb.ProductSetDiscount(
            discount_id="breakfast", name="Morning deal"), update_mask=mask("name"))


async def _b_delete_product_set_discount(env: Env) -> Request:
    await product_api.personalized(env.api)
    await product_api.breakfast_discount(env.api, discount_id="breakfast")
    await product_api.breakfast_discount(env.api, discount_id="brunch")
    return prodpb.DeleteProductSetDiscountRequest(request_id=rid(), discount_id="breakfast")


async def _b_select_products(env: Env) -> Request:
    await _coffee_lists(env, "c1")
    return prodpb.SelectProductsRequest(request_id=rid(), customer_id="c1",
                                        personalized_promotion_id="coffee",
                                        product_ids=["espresso"])


async def _b_apply_basket(env: Env) -> Request:
    await _coffee_lists(env, "c1")
    await product_api.breakfast_discount(env.api)
    return prodpb.ApplyBasketRequest(request_id=rid(), customer_id="c1",
                                     lines=list(product_api.BASKET))


async def _b_create_bonus_definition(env: Env) -> Request:
    return bpb.CreateBonusDefinitionRequest(request_id=rid(), definition=bonus_api.definition(
        "deposit-50", bonus_api.LAST_DEPOSIT_50))


async def _b_update_bonus_definition(env: Env) -> Request:
    await _bonus_definition(env, "deposit-50")
    return bpb.UpdateBonusDefinitionRequest(
        request_id=rid(), definition=bpb.BonusDefinition(definition_id="deposit-50",
                                                         display_name="Half a deposit"),
        update_mask=mask("display_name"))


async def _b_request_bonus_calculation(env: Env) -> Request:
    await _bonus_definition(env, "deposit-50")
    await bonus_api.customers(env.api, ("c1", "EUR", "UTC"), ("c2", "EUR", "UTC"))
    return bpb.RequestBonusCalculationRequest(request_id=rid(), definition_id="deposit-50",
                                              customer_ids=["c1"])


async def _b_approve_bonus_results(env: Env) -> Request:
    found = await _manual_bonus_results(env)
    env.found["other"] = [found["m2"].bonus_id]
    return bpb.ApproveBonusResultsRequest(request_id=rid(), bonus_ids=[found["m1"].bonus_id])


async def _b_reject_bonus_results(env: Env) -> Request:
    found = await _manual_bonus_results(env)
    env.found["other"] = [found["m2"].bonus_id]
    return bpb.RejectBonusResultsRequest(request_id=rid(), bonus_ids=[found["m1"].bonus_id],
                                         reason="bonus abuse")


async def _b_recalculate_bonus_results(env: Env) -> Request:
    await _manual_bonus_results(env)
    await bonus_api.create(env.api, bonus_api.definition("other", bonus_api.LAST_DEPOSIT_50))
    await bonus_api.stub(env.api).UpdateBonusDefinition(bpb.UpdateBonusDefinitionRequest(
        request_id=rid(), definition=bpb.BonusDefinition(definition_id="manual-10",
                                                         formula="sum(deposit.amount) * 20%"),
        update_mask=mask("formula")), metadata=env.api.key())
    return bpb.RecalculateBonusResultsRequest(request_id=rid(), definition_id="manual-10")


async def _b_create_bonus_rule(env: Env) -> Request:
    await _bonus_definition(env, "bets-10")
    return bpb.CreateBonusRuleRequest(request_id=rid(), rule=bpb.BonusRule(
        rule_id="each-bet", definition_id="bets-10", event_kind="bet", every=1))


async def _b_update_bonus_rule(env: Env) -> Request:
    await _bonus_rule(env)
    return bpb.UpdateBonusRuleRequest(request_id=rid(), rule=bpb.BonusRule(
        rule_id="each-bet", every=5), update_mask=mask("every"))


async def _b_create_bonus_schedule(env: Env) -> Request:
    await _bonus_definition(env, "bets-10")
    await bonus_api.customers(env.api, ("z1", "EUR", "UTC"))
    return bpb.CreateBonusScheduleRequest(request_id=rid(), schedule=_schedule())


async def _b_update_bonus_schedule(env: Env) -> Request:
    await _bonus_schedule(env)
    return bpb.UpdateBonusScheduleRequest(request_id=rid(), schedule=bpb.BonusSchedule(
        schedule_id="daily", local_time="08:00"), update_mask=mask("local_time"))


async def _b_retry_job(env: Env) -> Request:
    """Two dead outbox jobs (a campaign's execution and its notification), as the sweeper
    leaves jobs out of attempts."""
    await _campaigns(env, "camp-1")
    async with env.pool.acquire() as conn:
        await conn.execute("UPDATE outbox_jobs SET status = 'dead', finished_at = $1, "
                           "last_error = 'interrupted 8 times'", env.clock.now())
        jobs = {r["kind"]: str(r["id"]) for r in await conn.fetch(
            "SELECT kind, id FROM outbox_jobs")}
    env.found["other"] = jobs["campaign.notify"]
    return RPCS["JobService/RetryJob"].request_type(request_id=rid(),
                                                    job_id=jobs["campaign.execute"])


def _set(path: str, value: object) -> Change:
    """A change setting one (possibly nested, dotted) field."""
    *parents, last = path.split(".")

    def fn(request: Any) -> None:
        target = request
        for part in parents:
            target = getattr(target, part)
        setattr(target, last, value)
    return edit(fn)


def _repeated(path: str, values: list[Any]) -> Change:
    *parents, last = path.split(".")

    def fn(request: Any) -> None:
        target = request
        for part in parents:
            target = getattr(target, part)
        del getattr(target, last)[:]
        getattr(target, last).extend(values)
    return edit(fn)


ROWS = [
    # RewardTypeService
    Row("RewardTypeService/CreateRewardType", "admin", _b_create_reward_type,
        [("reward_type.display_name", _set("reward_type.display_name", "Free spins"))]),
    Row("RewardTypeService/UpdateRewardType", "admin", _b_update_reward_type,
        [("reward_type.display_name", _set("reward_type.display_name", "Cash"))]),
    # PromotionService
    Row("PromotionService/CreatePromotion", "admin", _b_create_promotion,
        [("promotion.name", _set("promotion.name", "Another name")),
         ("activate", _set("activate", True))]),
    Row("PromotionService/UpdatePromotion", "admin", _b_update_promotion,
        [("promotion.name", _set("promotion.name", "Renamed again"))]),
    Row("PromotionService/ActivatePromotion", "admin", _b_activate_promotion,
        [("promotion_code", _set("promotion_code", "VIP26"))]),
    Row("PromotionService/DeactivatePromotion", "admin", _b_deactivate_promotion,
        [("promotion_code", _set("promotion_code", "VIP26"))]),
    # RewardService (GetReward: README "Request ids")
    Row("RewardService/GetReward", "runtime", _b_get_reward,
        [("customer_id", _set("customer_id", "c2")),
         ("external_values", edit(lambda r: r.external_values.update({"credit": "6"})))],
        retry_existing=True, other_caller_replayed=True),
    Row("RewardService/RevokeGrant", "runtime", _b_revoke_grant,
        [("grant_id", _other("grant_id")), ("reason", _set("reason", "fraud"))]),
    # CodePoolService (a client stream)
    Row("CodePoolService/UploadCodes", "admin", _b_upload_codes,
        [("data", edit(lambda r: setattr(r[1], "data", codes_file("OTHER", 2))))]),
    # CustomerService
    Row("CustomerService/UpsertCustomers", "runtime", _b_upsert_customers,
        [("customers[0].currency", edit(lambda r: setattr(r.customers[0], "currency", "USD")))]),
    Row("CustomerService/RecordEvents", "runtime", _b_record_events,
        [("events[0].amount", edit(lambda r: setattr(r.events[0], "amount", "11")))]),
    # CampaignService / ClearanceService
    Row("CampaignService/CreateCampaign", "admin", _b_create_campaign,
        [("campaign.name", _set("campaign.name", "Campaign one")),
         ("customer_ids", _repeated("customer_ids", ["c1", "c2"]))]),
    Row("CampaignService/AddCampaignTargets", "admin", _b_add_campaign_targets,
        [("customer_ids", _repeated("customer_ids", ["c4"]))]),
    Row("CampaignService/CancelCampaign", "admin", _b_cancel_campaign,
        [("campaign_id", _set("campaign_id", "camp-2"))]),
    # Request ids scoped to the campaign (campaigns.proto, README "Request ids"): the same id
    # for another campaign is another request (test_clearance_request_ids_are_per_campaign).
    Row("ClearanceService/UpdateCustomerPromotionStatus", "listener",
        _b_update_customer_promotion_status,
        [("statuses[0].approved", edit(lambda r: setattr(r.statuses[0], "approved", False)))]),
    # ListenerService
    Row("ListenerService/RegisterListener", "admin", _b_register_listener,
        [("listener.url", _set("listener.url", "https://hooks.example.com/b"))]),
    Row("ListenerService/UpdateListener", "admin", _b_update_listener,
        [("listener.description", _set("listener.description", "compliance"))]),
    Row("ListenerService/UnregisterListener", "admin", _b_unregister_listener,
        [("listener_id", _other("listener_id"))]),
    Row("ListenerService/RedeliverEvent", "admin", _b_redeliver_event,
        [("delivery_id", _other("delivery_id"))]),
    # ProductPromotionService
    Row("ProductPromotionService/CreatePersonalizedPromotion", "admin",
        _b_create_personalized_promotion,
        [("personalized_promotion.name", _set("personalized_promotion.name", "My coffee"))]),
    Row("ProductPromotionService/UpdatePersonalizedPromotion", "admin",
        _b_update_personalized_promotion,
        [("personalized_promotion.name", _set("personalized_promotion.name", "Any coffee"))]),
    Row("ProductPromotionService/DeletePersonalizedPromotion", "admin",
        _b_delete_personalized_promotion, [("backend_id", _set("backend_id", "tea"))]),
    Row("ProductPromotionService/AssignProductLists", "admin", _b_assign_product_lists,
        [("product_ids", _repeated("product_ids", ["espresso", "mocha"]))]),
    Row("ProductPromotionService/RemoveProductLists", "admin", _b_remove_product_lists,
        [("customer_ids", _repeated("customer_ids", ["c2"]))]),
    Row("ProductPromotionService/CreateProductSetDiscount", "admin",
        _b_create_product_set_discount,
        [("product_set_discount.value", _set("product_set_discount.value", "40"))]),
    Row("ProductPromotionService/UpdateProductSetDiscount", "admin",
        _b_update_product_set_discount,
        [("product_set_discount.name", _set("product_set_discount.name", "Evening deal"))]),
    Row("ProductPromotionService/DeleteProductSetDiscount", "admin",
        _b_delete_product_set_discount, [("discount_id", _set("discount_id", "brunch"))]),
    Row("ProductPromotionService/SelectProducts", "runtime", _b_select_products,
        [("product_ids", _repeated("product_ids", ["latte"]))]),
    Row("ProductPromotionService/ApplyBasket", "runtime", _b_apply_basket,
        [("lines[2].quantity", edit(lambda r: setattr(r.lines[2], "quantity", 3)))]),
    # BonusService
    Row("BonusService/CreateBonusDefinition", "admin", _b_create_bonus_definition,
        [("definition.display_name", _set("definition.display_name", "Deposit 50"))]),
    Row("BonusService/UpdateBonusDefinition", "admin", _b_update_bonus_definition,
        [("definition.display_name", _set("definition.display_name", "Half"))]),
    Row("BonusService/RequestBonusCalculation", "runtime", _b_request_bonus_calculation,
        [("customer_ids", _repeated("customer_ids", ["c2"]))]),
    Row("BonusService/ApproveBonusResults", "admin", _b_approve_bonus_results,
        [("bonus_ids", _other("bonus_ids"))]),
    Row("BonusService/RejectBonusResults", "admin", _b_reject_bonus_results,
        [("bonus_ids", _other("bonus_ids")), ("reason", _set("reason", "duplicate account"))]),
    Row("BonusService/RecalculateBonusResults", "admin", _b_recalculate_bonus_results,
        [("definition_id", _set("definition_id", "other"))]),
    Row("BonusService/CreateBonusRule", "admin", _b_create_bonus_rule,
        [("rule.every", _set("rule.every", 2))]),
    Row("BonusService/UpdateBonusRule", "admin", _b_update_bonus_rule,
        [("rule.every", _set("rule.every", 6))]),
    Row("BonusService/CreateBonusSchedule", "admin", _b_create_bonus_schedule,
        [("schedule.local_time", _set("schedule.local_time", "07:00"))]),
    Row("BonusService/UpdateBonusSchedule", "admin", _b_update_bonus_schedule,
        [("schedule.local_time", _set("schedule.local_time", "09:00"))]),
    # JobService (new in the working tree; its row goes with the RPC)
    *([Row("JobService/RetryJob", "admin", _b_retry_job, [("job_id", _other("job_id"))])]
      if "JobService/RetryJob" in RPCS else []),
]


def test_the_matrix_covers_every_mutating_rpc_of_the_descriptors() -> None:
    """A new mutating RPC (a request with request_id) cannot be forgotten here."""
    assert len(MUTATING) >= 39  # as found when this file was written
    assert sorted(row.rpc for row in ROWS) == MUTATING
    assert len({row.rpc for row in ROWS}) == len(ROWS)
    assert [RPCS[r].path for r in MUTATING if RPCS[r].client_streaming] == [
        "/promo.v1.CodePoolService/UploadCodes"]


def test_each_row_calls_with_a_role_the_rpc_accepts() -> None:
    from server.app import METHOD_ROLES

    wrong = {row.rpc: sorted(METHOD_ROLES[RPCS[row.rpc].path]) for row in ROWS
             if row.role not in METHOD_ROLES[RPCS[row.rpc].path] | {"admin"}
             or (row.role == "admin" and METHOD_ROLES[RPCS[row.rpc].path] - {"admin"})}
    assert wrong == {}


@pytest.mark.parametrize("row", [row.param() for row in ROWS])
async def test_request_id_contract(env: Env, row: Row) -> None:
    request = await row.build(env)
    first = await _call(env, row.rpc, request, row.role)
    assert first.code == "OK", f"(1) first call: {first}"
    problems: dict[str, object] = {}
    dumps = [await _dump(env.pool)]

    async def unchanged(check: str) -> None:
        """Nothing changed since the step before (a change is reported once, by its step)."""
        dumps.append(await _dump(env.pool))
        if diff := _changed_tables(dumps[-2], dumps[-1]):
            problems[f"{check}: tables changed"] = diff

    # (2) the same id and request: the first answer, byte for byte, and nothing changes.
    expected = first.body
    if row.retry_existing:
        answer = RPCS[row.rpc].response_type.FromString(first.body)
        assert not answer.existing
        answer.existing = True
        expected = answer.SerializeToString(deterministic=True)
    async def retried(check: str) -> None:
        retry = await _call(env, row.rpc, request, row.role)
        if retry.code != "OK":
            problems[check] = str(retry)
        elif retry.body != expected:
            problems[check] = "another answer than the first"
        await unchanged(check)

    await retried("(2) retry")

    # (3) the same id with a changed field: REQUEST_ID_REUSED, nothing changes.
    for label, change in row.changes:
        reused = await _call(env, row.rpc, change(request, env), row.role)
        if (reused.code, reused.reason) != ("INVALID_ARGUMENT", "REQUEST_ID_REUSED"):
            problems[f"(3) changed {label}"] = str(reused)
        await unchanged(f"(3) changed {label}")

    # (4) the same id and request from another caller of the same role.
    other = await _call(env, row.rpc, request, row.role, other=True)
    if row.other_caller_replayed:
        if other.code != "OK" or other.body != expected:
            problems["(4) other caller"] = str(other) if other.code != "OK" else "another answer"
    elif (other.code, other.reason) != ("INVALID_ARGUMENT", "REQUEST_ID_REUSED"):
        problems["(4) other caller"] = str(other)
    await unchanged("(4) other caller")

    # (5) no request_id: INVALID_ARGUMENT, nothing changes.
    missing = await _call(env, row.rpc, _without_request_id(request), row.role)
    if (missing.code, missing.reason) != ("INVALID_ARGUMENT", "INVALID_REQUEST_ID"):
        problems["(5) no request_id"] = str(missing)
    await unchanged("(5) no request_id")

    # (2) again, later: past a campaign's execute_at, a batching window, a cap period...
    env.clock.advance(timedelta(days=2))
    await retried("(2) retry two days later")

    assert problems == {}, "\n".join(f"{check}: {what}" for check, what in problems.items())


async def test_clearance_request_ids_are_per_campaign(api: Api, clock: FixedClock,
                                                      pool: asyncpg.Pool) -> None:
    """UpdateCustomerPromotionStatus's request ids are scoped to the campaign (a listener
    numbering its calls per campaign): the same id for another campaign is that campaign's own
    request; for the same campaign, a changed request is REQUEST_ID_REUSED."""
    await reward_type(api)
    await promotion(api, "VIP25")
    for campaign_id in ("camp-1", "camp-2"):
        await create_campaign(api, campaign_id, clock.now() + timedelta(days=1),
                              customers=["c1", "c2"])
    first = await set_statuses(api, "camp-1", {"c1": True}, "batch-1")
    other = await set_statuses(api, "camp-2", {"c1": False, "c2": True}, "batch-1")
    assert (first.updated, other.updated) == (1, 2)
    assert [tuple(r) for r in await pool.fetch(
        """SELECT c.campaign_id AS campaign, t.customer_id, t.approved FROM campaign_targets t
             JOIN campaigns c ON c.id = t.campaign_id WHERE t.approved IS NOT NULL
            ORDER BY 1, 2""")] == [("camp-1", "c1", True), ("camp-2", "c1", False),
                                   ("camp-2", "c2", True)]
    with pytest.raises(grpc.RpcError) as caught:
        await set_statuses(api, "camp-1", {"c1": False}, "batch-1")
    assert rpc_error_reason(caught.value) == "REQUEST_ID_REUSED"
