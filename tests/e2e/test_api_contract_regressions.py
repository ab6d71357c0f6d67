"""Contract audit: the API conventions of README ("Conventions of the API") and DESIGN.md
("Contract style", "Invariants") checked RPC by RPC through a real server.

- roles: a key without an RPC's role is PERMISSION_DENIED (ROLE_REQUIRED), on every RPC;
- request ids: one holding a character PostgreSQL cannot store is INVALID_ARGUMENT, never
  INTERNAL, and nothing is written;
- lookups: an id no resource can have (a NUL character, 10,000 characters) is NOT_FOUND or
  INVALID_ARGUMENT with a google.rpc ErrorInfo reason, never INTERNAL or a transport error;
- decimals: an amount beyond the documented 14 integer digits is INVALID_DECIMAL;
- lists: page_size 0 / above the maximum, paging through several pages without loss or
  repetition, and edited or foreign page tokens are INVALID_PAGE_TOKEN;
- updates: fields outside update_mask are left as they are.
"""

from __future__ import annotations

import base64
import importlib
import json
from collections.abc import Awaitable, Callable
from datetime import timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import bonuses_pb2_grpc as bpb_grpc
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import codes_pb2 as codepb
from promo.v1 import codes_pb2_grpc as codepb_grpc
from promo.v1 import customers_pb2 as custpb
from promo.v1 import customers_pb2_grpc as custpb_grpc
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import products_pb2 as prodpb
from promo.v1 import products_pb2_grpc as prodpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import create_campaign
from tests.e2e.promo_helpers import promotion, reward_type

_SERVICE_MODULES = ("bonuses", "campaigns", "codes", "customers", "formulas", "listeners",
                    "products", "promotions", "reward_types", "rewards")


async def _failure(call: Awaitable[object]) -> tuple[str, str | None, str]:
    """(status code, ErrorInfo reason, message) of a call expected to fail; ("OK", ...) if not."""
    try:
        await call
    except grpc.RpcError as exc:
        try:
            reason = rpc_error_reason(exc)
        except ValueError:  # details that contradict the status code: no usable ErrorInfo
            reason = None
        return exc.code().name, reason, exc.details() or ""
    return "OK", None, ""


def _all_roles() -> dict[str, set[str]]:
    roles: dict[str, set[str]] = {}
    for name in _SERVICE_MODULES:
        roles.update(importlib.import_module(f"server.{name}").ROLES)
    return roles


def _all_methods() -> list[tuple[str, object, object]]:
    """(full method path, the method's descriptor, its generated module) of every RPC."""
    out = []
    for name in _SERVICE_MODULES:
        module = importlib.import_module(f"promo.v1.{name}_pb2")
        for service in module.DESCRIPTOR.services_by_name.values():
            for method in service.methods:
                out.append((f"/{service.full_name}/{method.name}", method, module))
    return out


# --- Roles ------------------------------------------------------------------------------------

@pytest.mark.parametrize("role", ["runtime", "listener"])
async def test_every_rpc_enforces_its_roles(api: Api, role: str) -> None:
    """Each RPC of every service: a key whose role is not in the RPC's ROLES entry (admin may
    call everything) is PERMISSION_DENIED / ROLE_REQUIRED before any validation; a key with
    the role gets past the check (whatever the empty request then earns)."""
    roles = _all_roles()
    wrong: dict[str, object] = {}
    for path, method, module in _all_methods():
        request_type = getattr(module, method.input_type.name)  # type: ignore[attr-defined]
        call = api.channel.unary_unary(path, request_serializer=request_type.SerializeToString,
                                       response_deserializer=lambda raw: raw)
        if method.client_streaming:  # type: ignore[attr-defined]
            call = api.channel.stream_unary(  # type: ignore[assignment]
                path, request_serializer=request_type.SerializeToString,
                response_deserializer=lambda raw: raw)

            async def one(request_type: type = request_type):
                yield request_type()
            outcome = await _failure(call(one(), metadata=api.key(role)))  # type: ignore[arg-type]
        else:
            outcome = await _failure(call(request_type(), metadata=api.key(role)))
        allowed = role in roles.get(path, set())
        denied = outcome[:2] == ("PERMISSION_DENIED", "ROLE_REQUIRED")
        if allowed == denied:
            wrong[path] = outcome
        elif denied:
            assert "needs one of the roles" in outcome[2]
    assert wrong == {}


# --- Request ids ------------------------------------------------------------------------------

async def test_request_id_with_a_nul_character_is_invalid_argument(
        api: Api, pool: asyncpg.Pool) -> None:
    """README: every mutating call takes a request_id; DESIGN invariant 4: bad input gets a
    clear error. A request id holding NUL (valid in protobuf, not storable in PostgreSQL
    text) must be INVALID_ARGUMENT (as an empty or over-long one is: INVALID_REQUEST_ID), not
    INTERNAL, on an otherwise valid call; nothing is written."""
    await reward_type(api, "cashback")
    await promotion(api, "VIP25", activate=False)
    rt = rtpb_grpc.RewardTypeServiceStub(api.channel)
    promos = ppb_grpc.PromotionServiceStub(api.channel)
    customers = custpb_grpc.CustomerServiceStub(api.channel)
    seen = {
        "CreateRewardType": await _failure(rt.CreateRewardType(rtpb.CreateRewardTypeRequest(
            request_id="rt\x001", reward_type=rtpb.RewardType(
                name="spins", display_name="Spins", category=rtpb.REWARD_CATEGORY_UNITS)),
            metadata=api.key())),
        "UpdateRewardType": await _failure(rt.UpdateRewardType(rtpb.UpdateRewardTypeRequest(
            request_id="rt\x002", reward_type=rtpb.RewardType(name="cashback",
                                                              display_name="Cash"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"])), metadata=api.key())),
        "ActivatePromotion": await _failure(promos.ActivatePromotion(
            ppb.ActivatePromotionRequest(request_id="act\x00", promotion_code="VIP25"),
            metadata=api.key())),
        "UpsertCustomers": await _failure(customers.UpsertCustomers(
            custpb.UpsertCustomersRequest(request_id="up\x00", customers=[
                custpb.Customer(customer_id="c1")]), metadata=api.key("runtime"))),
    }
    assert {name: outcome[:2] for name, outcome in seen.items()} == dict.fromkeys(
        seen, ("INVALID_ARGUMENT", "INVALID_REQUEST_ID"))
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM reward_types") == 1
        assert await conn.fetchval("SELECT display_name FROM reward_types") == "Cashback"
        assert await conn.fetchval("SELECT status FROM promotions") != "ACTIVE"
        assert await conn.fetchval("SELECT count(*) FROM customers") == 0


# --- Lookups by ids no resource can have ------------------------------------------------------

def _lookups(api: Api, bad: str) -> dict[str, Callable[[], Awaitable[object]]]:
    rt = rtpb_grpc.RewardTypeServiceStub(api.channel)
    promos = ppb_grpc.PromotionServiceStub(api.channel)
    bonuses = bpb_grpc.BonusServiceStub(api.channel)
    codes = codepb_grpc.CodePoolServiceStub(api.channel)
    products = prodpb_grpc.ProductPromotionServiceStub(api.channel)
    campaigns = cpb_grpc.CampaignServiceStub(api.channel)
    customers = custpb_grpc.CustomerServiceStub(api.channel)
    admin = api.key()
    return {
        "GetRewardType": lambda: rt.GetRewardType(rtpb.GetRewardTypeRequest(name=bad),
                                                  metadata=admin),
        "UpdateRewardType": lambda: rt.UpdateRewardType(rtpb.UpdateRewardTypeRequest(
            request_id="u-bad", reward_type=rtpb.RewardType(name=bad, display_name="X"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"])), metadata=admin),
        "GetPromotion": lambda: promos.GetPromotion(ppb.GetPromotionRequest(promotion_code=bad),
                                            metadata=admin),
        "GetPromotionReconciliation": lambda: promos.GetPromotionReconciliation(
            ppb.GetPromotionReconciliationRequest(promotion_code=bad), metadata=admin),
        "ActivatePromotion": lambda: promos.ActivatePromotion(ppb.ActivatePromotionRequest(
            request_id="act-bad", promotion_code=bad), metadata=admin),
        "DeactivatePromotion": lambda: promos.DeactivatePromotion(ppb.DeactivatePromotionRequest(
            request_id="deact-bad", promotion_code=bad), metadata=admin),
        "GetBonusDefinition": lambda: bonuses.GetBonusDefinition(
            bpb.GetBonusDefinitionRequest(definition_id=bad), metadata=admin),
        "GetBonusRule": lambda: bonuses.GetBonusRule(bpb.GetBonusRuleRequest(rule_id=bad),
                                             metadata=admin),
        "RecalculateBonusResults": lambda: bonuses.RecalculateBonusResults(
            bpb.RecalculateBonusResultsRequest(request_id="recalc-bad", definition_id=bad),
            metadata=admin),
        "RequestBonusCalculation": lambda: bonuses.RequestBonusCalculation(
            bpb.RequestBonusCalculationRequest(request_id="calc-bad", definition_id=bad,
                                               customer_ids=["c1"]), metadata=admin),
        "GetBonusResult": lambda: bonuses.GetBonusResult(bpb.GetBonusResultRequest(bonus_id=bad),
                                                 metadata=admin),
        "GetCodeInventory": lambda: codes.GetCodeInventory(
            codepb.GetCodeInventoryRequest(promotion_code=bad), metadata=admin),
        "GetPersonalizedPromotion": lambda: products.GetPersonalizedPromotion(
            prodpb.GetPersonalizedPromotionRequest(backend_id=bad), metadata=admin),
        "DeletePersonalizedPromotion": lambda: products.DeletePersonalizedPromotion(
            prodpb.DeletePersonalizedPromotionRequest(request_id="del-bad", backend_id=bad),
            metadata=admin),
        "ListProductLists": lambda: products.ListProductLists(
            prodpb.ListProductListsRequest(personalized_promotion_id=bad), metadata=admin),
        "GetProductSetDiscount": lambda: products.GetProductSetDiscount(
            prodpb.GetProductSetDiscountRequest(discount_id=bad), metadata=admin),
        "DeleteProductSetDiscount": lambda: products.DeleteProductSetDiscount(
            prodpb.DeleteProductSetDiscountRequest(request_id="deld-bad", discount_id=bad),
            metadata=admin),
        "GetCustomerProductPromotions": lambda: products.GetCustomerProductPromotions(
            prodpb.GetCustomerProductPromotionsRequest(customer_id=bad),
            metadata=api.key("runtime")),
        "GetCampaign": lambda: campaigns.GetCampaign(cpb.GetCampaignRequest(campaign_id=bad),
                                             metadata=admin),
        "GetCustomer": lambda: customers.GetCustomer(custpb.GetCustomerRequest(customer_id=bad),
                                             metadata=admin),
    }


@pytest.mark.parametrize("bad", ["a\x00b", "x" * 10_000], ids=["nul", "10k-chars"])
@pytest.mark.parametrize("rpc", [
    "GetRewardType", "UpdateRewardType", "GetPromotion", "GetPromotionReconciliation",
    "ActivatePromotion", "DeactivatePromotion", "GetBonusDefinition", "GetBonusRule",
    "RecalculateBonusResults", "RequestBonusCalculation", "GetBonusResult", "GetCodeInventory",
    "GetPersonalizedPromotion", "DeletePersonalizedPromotion", "ListProductLists",
    "GetProductSetDiscount", "DeleteProductSetDiscount", "GetCustomerProductPromotions",
    "GetCampaign", "GetCustomer"])
async def test_an_id_no_resource_can_have_is_a_clear_error(api: Api, rpc: str, bad: str) -> None:
    """DESIGN invariant 4 / README: an unknown or impossible id is NOT_FOUND (or
    INVALID_ARGUMENT) with a google.rpc ErrorInfo reason; never INTERNAL, and never an error
    whose trailers are too large for a default client (RESOURCE_EXHAUSTED, no ErrorInfo)."""
    code, reason, message = await _failure(_lookups(api, bad)[rpc]())
    assert code in ("NOT_FOUND", "INVALID_ARGUMENT"), (code, reason, message[:200])
    assert reason is not None and reason != "INTERNAL"


# --- Decimals ---------------------------------------------------------------------------------

async def test_an_amount_with_too_many_integer_digits_in_exponent_form_is_invalid_decimal(
        api: Api, pool: asyncpg.Pool) -> None:
    """core.money: an amount has at most 14 integer digits and 6 decimal places
    ("100000000000000000000" is INVALID_DECIMAL). The same number written with an exponent
    ("1e20") is the same amount and must be refused the same way, not reach the numeric(20, 6)
    column and fail there (INTERNAL)."""
    stub = rtpb_grpc.RewardTypeServiceStub(api.channel)
    seen = {}
    for n, text in enumerate(("100000000000000000000", "1e20")):
        seen[text] = (await _failure(stub.CreateRewardType(rtpb.CreateRewardTypeRequest(
            request_id=f"big-{n}", reward_type=rtpb.RewardType(
                name=f"big{n}", display_name="Big", category=rtpb.REWARD_CATEGORY_AMOUNT,
                max_value=text)), metadata=api.key())))[:2]
    assert seen == dict.fromkeys(seen, ("INVALID_ARGUMENT", "INVALID_DECIMAL"))
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM reward_types") == 0


# --- Lists ------------------------------------------------------------------------------------

async def _reward_type_rows(pool: asyncpg.Pool, count: int) -> list[str]:
    names = [f"type_{i:04d}" for i in range(count)]
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO reward_types (name, display_name, category) VALUES ($1, $1, 'UNITS')",
            [(name,) for name in names])
    return names


async def test_page_size_zero_is_50_and_above_1000_is_1000(api: Api, pool: asyncpg.Pool) -> None:
    """README: page_size 0 means 50, at most 1000 (a larger one is lowered, not refused), and
    paging through more than one full page neither loses nor repeats an item."""
    names = await _reward_type_rows(pool, 1003)
    stub = rtpb_grpc.RewardTypeServiceStub(api.channel)
    default = await stub.ListRewardTypes(rtpb.ListRewardTypesRequest(), metadata=api.key())
    assert [r.name for r in default.reward_types] == names[:50]
    assert default.next_page_token
    first = await stub.ListRewardTypes(rtpb.ListRewardTypesRequest(page_size=5000),
                                       metadata=api.key())
    assert len(first.reward_types) == 1000
    rest = await stub.ListRewardTypes(rtpb.ListRewardTypesRequest(
        page_size=5000, page_token=first.next_page_token), metadata=api.key())
    assert rest.next_page_token == ""
    assert [r.name for r in [*first.reward_types, *rest.reward_types]] == names


async def test_an_edited_page_token_is_invalid_page_token(api: Api, pool: asyncpg.Pool) -> None:
    """README: "Tokens are opaque: a token that was edited ... is INVALID_ARGUMENT
    (INVALID_PAGE_TOKEN)". Editing the position inside a genuine token (base64 JSON) to
    another well-formed name must not be accepted as a place to resume from."""
    await _reward_type_rows(pool, 6)
    stub = rtpb_grpc.RewardTypeServiceStub(api.channel)
    first = await stub.ListRewardTypes(rtpb.ListRewardTypesRequest(page_size=2),
                                       metadata=api.key())
    token = first.next_page_token
    payload = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    payload["a"] = ["type_0004"]  # skip ahead: the client edits where the next page starts
    edited = base64.urlsafe_b64encode(json.dumps(payload).encode()).decode().rstrip("=")
    outcome = await _failure(stub.ListRewardTypes(rtpb.ListRewardTypesRequest(
        page_size=2, page_token=edited), metadata=api.key()))
    assert outcome[:2] == ("INVALID_ARGUMENT", "INVALID_PAGE_TOKEN")


async def test_a_token_of_another_list_is_invalid_page_token(
        api: Api, pool: asyncpg.Pool) -> None:
    """A token issued by one List RPC (ListRewardTypes) and sent to another (ListCustomers,
    ListBonusDefinitions) is foreign: INVALID_ARGUMENT INVALID_PAGE_TOKEN, instead of silently
    starting the other list after an unrelated key (here skipping every customer)."""
    await _reward_type_rows(pool, 3)
    async with pool.acquire() as conn:
        await conn.executemany("INSERT INTO customers (customer_id) VALUES ($1)",
                               [("alice",), ("bob",)])
    stub = rtpb_grpc.RewardTypeServiceStub(api.channel)
    token = (await stub.ListRewardTypes(rtpb.ListRewardTypesRequest(page_size=1),
                                        metadata=api.key())).next_page_token
    assert token
    customers = custpb_grpc.CustomerServiceStub(api.channel)
    bonuses = bpb_grpc.BonusServiceStub(api.channel)
    try:
        listed = await customers.ListCustomers(custpb.ListCustomersRequest(page_token=token),
                                               metadata=api.key())
        as_customers: object = ("OK", [c.customer_id for c in listed.customers])
    except grpc.RpcError as exc:
        as_customers = (exc.code().name, rpc_error_reason(exc))
    seen = {
        "ListCustomers": as_customers,
        "ListBonusDefinitions": (await _failure(bonuses.ListBonusDefinitions(
            bpb.ListBonusDefinitionsRequest(page_token=token), metadata=api.key())))[:2],
    }
    assert seen == dict.fromkeys(seen, ("INVALID_ARGUMENT", "INVALID_PAGE_TOKEN"))


async def test_list_campaigns_pages_through_every_campaign_once(
        api: Api, clock: FixedClock) -> None:
    """ListCampaigns: a stable order (by campaign id), every campaign exactly once across
    pages, an empty next_page_token on the last page, and a token used with other status
    filters is INVALID_PAGE_TOKEN."""
    await reward_type(api)
    await promotion(api)
    ids = [f"camp-{i:02d}" for i in range(7)]
    for campaign_id in reversed(ids):
        await create_campaign(api, campaign_id, clock.now() + timedelta(days=1),
                              customers=["c1"])
    stub = cpb_grpc.CampaignServiceStub(api.channel)
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListCampaigns(cpb.ListCampaignsRequest(page_size=3, page_token=token),
                                        metadata=api.key())
        seen += [c.campaign_id for c in page.campaigns]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert seen == ids
    assert pages == 3
    first = await stub.ListCampaigns(cpb.ListCampaignsRequest(page_size=3), metadata=api.key())
    outcome = await _failure(stub.ListCampaigns(cpb.ListCampaignsRequest(
        page_size=3, page_token=first.next_page_token,
        statuses=[cpb.CAMPAIGN_STATUS_CANCELLED]), metadata=api.key()))
    assert outcome[:2] == ("INVALID_ARGUMENT", "INVALID_PAGE_TOKEN")


# --- Updates ----------------------------------------------------------------------------------

async def test_update_promotion_changes_only_the_masked_fields(api: Api) -> None:
    """UpdatePromotion with update_mask ["name"] and a message whose other fields differ
    changes the name only; an unknown path is INVALID_ARGUMENT INVALID_UPDATE_MASK naming it,
    and a retry with the same request_id replays the answer."""
    await reward_type(api)
    before = await promotion(api, activate=False, customer_cap=3)
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    request = ppb.UpdatePromotionRequest(
        request_id="rename-1", promotion=ppb.Promotion(
            promotion_code="VIP25", name="Renamed", description="not in the mask",
            customer_cap=9, time_zone="Europe/Berlin"),
        update_mask=field_mask_pb2.FieldMask(paths=["name"]))
    updated = (await stub.UpdatePromotion(request, metadata=api.key())).promotion
    assert updated.name == "Renamed"
    assert (updated.description, updated.customer_cap, updated.time_zone,
            list(updated.rewards)) == (before.description, 3, before.time_zone,
                                       list(before.rewards))
    again = (await stub.UpdatePromotion(request, metadata=api.key())).promotion
    assert again == updated
    code, reason, message = await _failure(stub.UpdatePromotion(ppb.UpdatePromotionRequest(
        request_id="rename-2", promotion=ppb.Promotion(promotion_code="VIP25", name="X"),
        update_mask=field_mask_pb2.FieldMask(paths=["name", "colour"])), metadata=api.key()))
    assert (code, reason) == ("INVALID_ARGUMENT", "INVALID_UPDATE_MASK")
    assert "colour" in message


# --- Retries ----------------------------------------------------------------------------------

async def test_retries_replay_and_reused_ids_are_refused_across_services(
        api: Api, clock: FixedClock, pool: asyncpg.Pool) -> None:
    """README: retrying with the same request_id returns the first answer and changes nothing;
    the same id for a different request is INVALID_ARGUMENT REQUEST_ID_REUSED. Checked on
    CreatePromotion, CreateCampaign, UpsertCustomers and RegisterListener."""
    await reward_type(api)
    promos = ppb_grpc.PromotionServiceStub(api.channel)
    campaigns = cpb_grpc.CampaignServiceStub(api.channel)
    customers = custpb_grpc.CustomerServiceStub(api.channel)
    listeners = lpb_grpc.ListenerServiceStub(api.channel)

    def promo_request(code: str) -> ppb.CreatePromotionRequest:
        return ppb.CreatePromotionRequest(request_id="p-1", activate=True, promotion=ppb.Promotion(
            promotion_code=code, name=code, time_zone="UTC", rewards=[ppb.PromotionReward(
                reward_type="cashback", kind=ppb.REWARD_KIND_SINGLE, value="5")]))

    def campaign_request(name: str) -> cpb.CreateCampaignRequest:
        stamp = clock.now() + timedelta(days=1)
        request = cpb.CreateCampaignRequest(request_id="c-1", customer_ids=["c1"],
                                            campaign=cpb.Campaign(
                                                campaign_id="spring", name=name,
                                                promotion_codes=["VIP25"]))
        request.campaign.execute_at.FromDatetime(stamp)
        return request

    def customers_request(tier: str) -> custpb.UpsertCustomersRequest:
        return custpb.UpsertCustomersRequest(request_id="u-1", customers=[custpb.Customer(
            customer_id="c1", properties={"tier": custpb.PropertyValue(string_value=tier)})])

    def listener_request(url: str) -> lpb.RegisterListenerRequest:
        return lpb.RegisterListenerRequest(request_id="l-1", listener=lpb.Listener(
            event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN, url=url))

    cases: list[tuple[str, Callable[[object], Awaitable[object]], object, object, str]] = [
        ("CreatePromotion", lambda r: promos.CreatePromotion(r, metadata=api.key()),
         promo_request("VIP25"), promo_request("VIP26"), "SELECT count(*) FROM promotions"),
        ("CreateCampaign", lambda r: campaigns.CreateCampaign(r, metadata=api.key()),
         campaign_request("Spring"), campaign_request("Autumn"),
         "SELECT count(*) || name FROM campaigns GROUP BY name"),
        ("UpsertCustomers", lambda r: customers.UpsertCustomers(r, metadata=api.key("runtime")),
         customers_request("gold"), customers_request("silver"),
         "SELECT properties::text FROM customers"),
        ("RegisterListener", lambda r: listeners.RegisterListener(r, metadata=api.key()),
         listener_request("https://hooks.example.com/a"),
         listener_request("https://hooks.example.com/b"),
         "SELECT count(*) FROM webhook_listeners"),
    ]
    problems: dict[str, object] = {}
    for name, call, first, other, probe in cases:
        answer = await call(first)
        async with pool.acquire() as conn:
            state = await conn.fetch(probe)
        again = await call(first)
        if again != answer:
            problems[f"{name} retry"] = "a different answer"
        reused = await _failure(call(other))  # type: ignore[arg-type]
        if reused[:2] != ("INVALID_ARGUMENT", "REQUEST_ID_REUSED"):
            problems[f"{name} reuse"] = reused
        async with pool.acquire() as conn:
            if await conn.fetch(probe) != state:
                problems[f"{name} state"] = "changed by a retry or a reused id"
    assert problems == {}


# --- List filters -----------------------------------------------------------------------------

def _filtered_lists(api: Api, bad: str) -> dict[str, Callable[[], Awaitable[object]]]:
    promos = ppb_grpc.PromotionServiceStub(api.channel)
    products = prodpb_grpc.ProductPromotionServiceStub(api.channel)
    bonuses = bpb_grpc.BonusServiceStub(api.channel)
    admin = api.key()
    calculated = [bpb.BONUS_STATUS_CALCULATED]
    return {
        "ListPromotions.search": lambda: promos.ListPromotions(
            ppb.ListPromotionsRequest(search=bad), metadata=admin),
        "ListPersonalizedPromotions.search": lambda: products.ListPersonalizedPromotions(
            prodpb.ListPersonalizedPromotionsRequest(search=bad), metadata=admin),
        "ListProductSetDiscounts.personalized_promotion_id": lambda:
            products.ListProductSetDiscounts(prodpb.ListProductSetDiscountsRequest(
                personalized_promotion_id=bad), metadata=admin),
        "ListBonusResults.customer_id": lambda: bonuses.ListBonusResults(
            bpb.ListBonusResultsRequest(statuses=calculated, customer_id=bad), metadata=admin),
        "ListBonusResults.definition_id": lambda: bonuses.ListBonusResults(
            bpb.ListBonusResultsRequest(statuses=calculated, definition_id=bad),
            metadata=admin),
        "ListBonusBatches.definition_id": lambda: bonuses.ListBonusBatches(
            bpb.ListBonusBatchesRequest(definition_id=bad), metadata=admin),
        "ListCustomerBonusLedger.customer_id": lambda: bonuses.ListCustomerBonusLedger(
            bpb.ListCustomerBonusLedgerRequest(customer_id=bad), metadata=admin),
    }


@pytest.mark.parametrize("bad", ["a\x00b", "x" * 10_000], ids=["nul", "10k-chars"])
@pytest.mark.parametrize("rpc", [
    "ListPromotions.search", "ListPersonalizedPromotions.search",
    "ListProductSetDiscounts.personalized_promotion_id", "ListBonusResults.customer_id",
    "ListBonusResults.definition_id", "ListBonusBatches.definition_id",
    "ListCustomerBonusLedger.customer_id"])
async def test_a_list_filter_no_resource_can_match_is_not_internal(
        api: Api, rpc: str, bad: str) -> None:
    """A List filter holding NUL or 10,000 characters either matches nothing (OK, empty) or is
    refused with a reason (INVALID_ARGUMENT / NOT_FOUND); never INTERNAL or an error whose
    trailers a default client cannot read."""
    code, reason, message = await _failure(_filtered_lists(api, bad)[rpc]())
    assert code in ("OK", "NOT_FOUND", "INVALID_ARGUMENT"), (code, reason, message[:200])
    assert code == "OK" or (reason is not None and reason != "INTERNAL")
