"""Design audit: what ../shared/DESIGN.md promises, checked through a real running server.

- "Contract style": per-RPC request/response messages, enums prefixed with `_UNSPECIFIED = 0`,
  services ending in `Service`, `page_size`/`page_token`/`next_page_token` on every List,
  `request_id` on every mutating call, `update_mask` on updates; health and reflection on.
- Invariant 2: a retry returns the first answer and changes nothing a second time (RPCs the
  other suites do not retry), never a second grant.
- Invariant 4: bad input gets a clear error (INVALID_ARGUMENT / FAILED_PRECONDITION /
  NOT_FOUND, a google.rpc ErrorInfo reason, a message a person can act on) and changes nothing.
- Invariant 5: amounts are exact decimals end to end (no float sums, no exponent notation).
- Invariant 6: period boundaries are local midnights of a named zone; DST days are 23 or 25
  hours long, never doubled or dropped; the clock is pinned.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, field_mask_pb2
from google.protobuf.descriptor import EnumDescriptor, FieldDescriptor
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import bonuses_pb2_grpc as bpb_grpc
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import customers_pb2 as custpb
from promo.v1 import customers_pb2_grpc as custpb_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import formulas_pb2_grpc as fpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc
from server.errors import error_info_of
from tests.conftest import Api
from tests.e2e.campaign_helpers import create_campaign, set_statuses, ts
from tests.e2e.code_helpers import code_promotion, codes_file, pool_counts, upload
from tests.e2e.promo_helpers import cap, get_promotion, get_reward, promotion, revoke, reward_type
from workers.bonuses import run_due_schedules

_MODULES = ("bonuses", "campaigns", "codes", "customers", "formulas", "listeners", "products",
            "promotions", "reward_types", "rewards")
_READ_ONLY_PREFIXES = ("Get", "List", "Validate", "DryRun", "Forecast", "Evaluate")


def _files() -> list[Any]:
    return [importlib.import_module(f"promo.v1.{name}_pb2").DESCRIPTOR for name in _MODULES]


def _methods() -> list[Any]:
    return [m for f in _files() for s in f.services_by_name.values() for m in s.methods]


def _service_names() -> list[str]:
    return [s.full_name for f in _files() for s in f.services_by_name.values()]


async def _failure(call: Awaitable[object]) -> tuple[str, str | None, str, dict[str, str]]:
    """(status code, ErrorInfo reason, message, ErrorInfo metadata); ("OK", ...) if none."""
    try:
        await call
    except grpc.RpcError as exc:
        info = error_info_of(exc)
        if info is None:
            return exc.code().name, None, exc.details() or "", {}
        assert info.domain == "promo.engine", info
        return exc.code().name, info.reason, exc.details() or "", dict(info.metadata)
    return "OK", None, "", {}


def _plain_decimal(text: str) -> bool:
    """A decimal string as a person writes it: no exponent, no float artefacts."""
    return re.fullmatch(r"-?[0-9]+(\.[0-9]+)?", text) is not None


# --- Contract style -------------------------------------------------------------------------

def test_names_follow_the_style_guide() -> None:
    """DESIGN "Contract style": package promo.v1 in a matching directory; services end in
    Service; one request and one response message per RPC (<Rpc>Request / <Rpc>Response, none
    shared); every enum, nested ones included, has <NAME>_UNSPECIFIED = 0 and prefixed values."""
    problems: list[str] = []
    used: dict[str, str] = {}

    def enums(owner: Any) -> list[EnumDescriptor]:
        found = list(owner.enum_types_by_name.values()) if hasattr(
            owner, "enum_types_by_name") else list(owner.enum_types)
        nested = owner.message_types_by_name.values() if hasattr(
            owner, "message_types_by_name") else owner.nested_types
        for message in nested:
            found += enums(message)
        return found

    for file in _files():
        if file.package != "promo.v1" or not file.name.startswith("promo/v1/"):
            problems.append(f"{file.name}: package {file.package}")
        for service in file.services_by_name.values():
            if not service.name.endswith("Service"):
                problems.append(f"service {service.full_name}")
            for method in service.methods:
                pair = (method.input_type.name, method.output_type.name)
                if pair != (f"{method.name}Request", f"{method.name}Response"):
                    problems.append(f"{method.full_name}: {pair}")
                for message in (method.input_type, method.output_type):
                    if used.setdefault(message.full_name, method.full_name) != method.full_name:
                        problems.append(f"{message.full_name} shared by {method.full_name}")
        for enum in enums(file):
            prefix = re.sub(r"(?<!^)(?=[A-Z])", "_", enum.name).upper() + "_"
            zero = enum.values_by_number.get(0)
            if zero is None or zero.name != f"{prefix}UNSPECIFIED":
                problems.append(f"enum {enum.full_name}: zero value {zero and zero.name}")
            problems += [f"enum value {v.name}" for v in enum.values
                         if not v.name.startswith(prefix)]
    assert problems == []


def test_every_list_rpc_pages() -> None:
    """DESIGN: page_size / page_token / next_page_token on every List (and on any other RPC
    that takes a page_token)."""
    problems: dict[str, object] = {}
    for method in _methods():
        request, response = method.input_type.fields_by_name, method.output_type.fields_by_name
        if not (method.name.startswith("List") or "page_token" in request):
            continue
        seen = {
            "page_size": request.get("page_size") and request["page_size"].type,
            "page_token": request.get("page_token") and request["page_token"].type,
            "next_page_token": response.get("next_page_token")
            and response["next_page_token"].type,
        }
        expected = {"page_size": FieldDescriptor.TYPE_INT32,
                    "page_token": FieldDescriptor.TYPE_STRING,
                    "next_page_token": FieldDescriptor.TYPE_STRING}
        if seen != expected:
            problems[method.full_name] = seen
    assert problems == {}


def test_every_mutating_rpc_takes_a_string_request_id() -> None:
    """DESIGN invariant 2 / "Contract style": request_id on every mutating call."""
    missing = [m.full_name for m in _methods() if not m.name.startswith(_READ_ONLY_PREFIXES)
               and (m.input_type.fields_by_name.get("request_id") is None
                    or m.input_type.fields_by_name["request_id"].type
                    != FieldDescriptor.TYPE_STRING)]
    assert missing == []


def test_every_update_of_a_resource_takes_an_update_mask() -> None:
    """DESIGN: update_mask on updates (AIP-134: Update<Resource> carries the resource and a
    google.protobuf.FieldMask). UpdateCustomerPromotionStatus is the seed's batch call on
    approvals (no resource field to mask), so it is not a standard update."""
    problems = []
    for method in _methods():
        if not method.name.startswith("Update"):
            continue
        resource = method.name.removeprefix("Update")
        fields = method.input_type.fields_by_name
        holds_resource = any(f.message_type is not None and f.message_type.name == resource
                             and not _repeated(f) for f in fields.values())
        if not holds_resource:
            assert method.name == "UpdateCustomerPromotionStatus", method.full_name
            continue
        mask = fields.get("update_mask")
        if mask is None or mask.message_type.full_name != "google.protobuf.FieldMask":
            problems.append(method.full_name)
    assert problems == []


def _repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


async def test_health_is_serving_for_the_server_and_every_service(api: Api) -> None:
    """DESIGN: standard grpc.health.v1 health checking is on: SERVING for "" and for each of
    the API's services (a load balancer may probe any of them)."""
    stub = health_pb2_grpc.HealthStub(api.channel)
    seen = {}
    for name in ["", *_service_names()]:
        reply = await stub.Check(health_pb2.HealthCheckRequest(service=name))
        seen[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    assert seen == dict.fromkeys(seen, "SERVING")


async def test_reflection_describes_every_service_so_grpcurl_works(api: Api) -> None:
    """DESIGN: server reflection is on "so grpcurl works": every service is listed, and the
    file holding it can be fetched with all its dependencies and resolves every method's
    request and response types (what `grpcurl describe` / a call with -d needs)."""
    stub = reflection_pb2_grpc.ServerReflectionStub(api.channel)

    async def ask(*requests: reflection_pb2.ServerReflectionRequest
                  ) -> list[reflection_pb2.ServerReflectionResponse]:
        async def stream() -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
            for request in requests:
                yield request
        return [r async for r in stub.ServerReflectionInfo(stream())]

    [listing] = await ask(reflection_pb2.ServerReflectionRequest(list_services=""))
    listed = {s.name for s in listing.list_services_response.service}
    assert set(_service_names()) | {"grpc.health.v1.Health"} <= listed
    pool = descriptor_pool.DescriptorPool()
    files: dict[str, descriptor_pb2.FileDescriptorProto] = {}
    replies = await ask(*(reflection_pb2.ServerReflectionRequest(file_containing_symbol=name)
                          for name in _service_names()))
    pending = [raw for reply in replies
               for raw in reply.file_descriptor_response.file_descriptor_proto]
    assert all(not r.HasField("error_response") for r in replies)
    while pending:
        for raw in pending:
            proto = descriptor_pb2.FileDescriptorProto.FromString(raw)
            files[proto.name] = proto
        missing = {d for f in files.values() for d in f.dependency} - set(files)
        pending = []
        if missing:
            more = await ask(*(reflection_pb2.ServerReflectionRequest(file_by_filename=name)
                               for name in sorted(missing)))
            assert all(not r.HasField("error_response") for r in more), sorted(missing)
            pending = [raw for r in more for raw in r.file_descriptor_response
                       .file_descriptor_proto]
    added: set[str] = set()

    def add(name: str) -> None:
        if name in added:
            return
        for dependency in files[name].dependency:
            add(dependency)
        pool.Add(files[name])
        added.add(name)

    for name in files:
        add(name)
    for method in _methods():
        found = pool.FindMethodByName(method.full_name)
        assert found.input_type.full_name == method.input_type.full_name
        assert found.output_type.full_name == method.output_type.full_name


# --- Invariant 2: retries return the first answer -------------------------------------------

async def test_a_deactivation_retried_after_a_reactivation_changes_nothing(api: Api) -> None:
    """Invariant 2: DeactivatePromotion retried with its request id after the promotion was
    activated again (under another id) replays the first answer and leaves it ACTIVE."""
    await reward_type(api)
    await promotion(api)
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    deactivate = ppb.DeactivatePromotionRequest(request_id="off-1", promotion_code="VIP25")
    first = await stub.DeactivatePromotion(deactivate, metadata=api.key())
    assert first.promotion.status == ppb.PROMOTION_STATUS_DEACTIVATED
    await stub.ActivatePromotion(ppb.ActivatePromotionRequest(
        request_id="on-2", promotion_code="VIP25"), metadata=api.key())
    retry = await stub.DeactivatePromotion(deactivate, metadata=api.key())
    assert retry == first
    assert (await get_promotion(api)).status == ppb.PROMOTION_STATUS_ACTIVE
    assert (await get_reward(api, "c1")).HasField("grant")


async def test_an_update_retried_after_a_later_update_does_not_undo_it(api: Api) -> None:
    """Invariant 2 on UpdateRewardType: a retry of the first edit, after a second edit,
    replays the first answer and does not write its value again."""
    await reward_type(api)
    stub = rtpb_grpc.RewardTypeServiceStub(api.channel)

    def edit(request_id: str, display_name: str) -> rtpb.UpdateRewardTypeRequest:
        return rtpb.UpdateRewardTypeRequest(
            request_id=request_id, reward_type=rtpb.RewardType(
                name="cashback", display_name=display_name),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name"]))

    first = await stub.UpdateRewardType(edit("e1", "Cash A"), metadata=api.key())
    await stub.UpdateRewardType(edit("e2", "Cash B"), metadata=api.key())
    assert await stub.UpdateRewardType(edit("e1", "Cash A"), metadata=api.key()) == first
    now = await stub.GetRewardType(rtpb.GetRewardTypeRequest(name="cashback"),
                                   metadata=api.key())
    assert now.reward_type.display_name == "Cash B"


async def test_an_approval_retried_after_a_rejection_does_not_undo_it(
        api: Api, clock: FixedClock) -> None:
    """Invariant 2 on UpdateCustomerPromotionStatus ("the last status wins"): a listener's
    retry of an earlier approval replays its answer; the later rejection stands."""
    await reward_type(api)
    await promotion(api)
    await create_campaign(api, "spring", clock.now() + timedelta(hours=2),
                          customers=["c1", "c2"])
    first = await set_statuses(api, "spring", {"c1": True}, "approve-1")
    await set_statuses(api, "spring", {"c1": False}, "reject-2")
    assert await set_statuses(api, "spring", {"c1": True}, "approve-1") == first
    page = await cpb_grpc.ClearanceServiceStub(api.channel).GetProcessedCampaignCustomers(
        cpb.GetProcessedCampaignCustomersRequest(campaign_id="spring"),
        metadata=api.key("listener"))
    assert {c.customer_id: c.approved for c in page.customers if c.HasField("approved")} == {
        "c1": False}


async def test_adding_targets_twice_with_one_request_id_adds_them_once(
        api: Api, clock: FixedClock) -> None:
    """Invariant 2 on AddCampaignTargets and CancelCampaign: a retry replays the first
    answer (added 2, not 0) and a reused id with other customers is REQUEST_ID_REUSED."""
    await reward_type(api)
    await promotion(api)
    await create_campaign(api, "spring", clock.now() + timedelta(hours=2), customers=["c1"])
    stub = cpb_grpc.CampaignServiceStub(api.channel)
    add = cpb.AddCampaignTargetsRequest(request_id="add-1", campaign_id="spring",
                                        customer_ids=["c2", "c3"])
    first = await stub.AddCampaignTargets(add, metadata=api.key())
    assert (first.added, first.target_count) == (2, 3)
    assert await stub.AddCampaignTargets(add, metadata=api.key()) == first
    other = cpb.AddCampaignTargetsRequest(request_id="add-1", campaign_id="spring",
                                          customer_ids=["c4"])
    assert (await _failure(stub.AddCampaignTargets(other, metadata=api.key())))[:2] == (
        "INVALID_ARGUMENT", "REQUEST_ID_REUSED")
    cancel = cpb.CancelCampaignRequest(request_id="cancel-1", campaign_id="spring")
    cancelled = await stub.CancelCampaign(cancel, metadata=api.key())
    assert await stub.CancelCampaign(cancel, metadata=api.key()) == cancelled
    got = await stub.GetCampaign(cpb.GetCampaignRequest(campaign_id="spring"),
                                 metadata=api.key())
    assert (got.campaign.target_count, got.campaign.status) == (3,
                                                                cpb.CAMPAIGN_STATUS_CANCELLED)


async def test_a_grant_retried_after_its_revocation_is_not_granted_again(
        api: Api, pool: asyncpg.Pool) -> None:
    """Invariant 2: "a retry returns the first answer, never a second grant". After the grant
    is revoked (its budget and customer slot return), the same request id still answers with
    that grant, now revoked, and charges nothing."""
    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_LIFETIME, "100")])
    first = await get_reward(api, "c1", request_id="act-1")
    assert (await revoke(api, first.grant.grant_id)).revoked
    retry = await get_reward(api, "c1", request_id="act-1")
    assert retry.HasField("grant") and retry.existing
    assert (retry.grant.grant_id, retry.grant.revoked) == (first.grant.grant_id, True)
    assert await pool.fetchval("SELECT count(*) FROM grants") == 1
    lifetime = next(u for u in (await get_promotion(api)).cap_usage if u.scope == "cashback")
    assert Decimal(lifetime.used) == 0


async def test_a_get_reward_request_id_is_scoped_to_its_promotion(
        api: Api, pool: asyncpg.Pool) -> None:
    """Invariant 2, "At most one reward per request", with GetReward's documented scope
    (rewards.proto, README): a request is a promotion's, so the same id on another promotion
    is another request with its own grant; on the same promotion, a retry is the first grant
    and the id for another customer is REQUEST_ID_REUSED (nothing more is granted)."""
    await reward_type(api)
    await promotion(api, "VIP25")
    await promotion(api, "VIP26")
    first = await get_reward(api, "c1", "VIP25", request_id="act-7")
    other_promotion = await get_reward(api, "c1", "VIP26", request_id="act-7")
    assert first.HasField("grant") and other_promotion.HasField("grant")
    assert first.grant.grant_id != other_promotion.grant.grant_id
    retry = await get_reward(api, "c1", "VIP25", request_id="act-7")
    assert retry.grant.grant_id == first.grant.grant_id and retry.existing
    outcome = await _failure(get_reward(api, "c2", "VIP25", request_id="act-7"))
    assert outcome[:2] == ("INVALID_ARGUMENT", "REQUEST_ID_REUSED"), outcome
    assert await pool.fetchval("SELECT count(*) FROM grants") == 2


async def test_a_customer_never_receives_two_codes_from_one_pool(
        api: Api, pool: asyncpg.Pool) -> None:
    """Invariant 2: "A customer never receives two codes from one pool." The same customer
    activated through the promotion directly and through a campaign (e.g. an e-mail, then a
    reminder push) holds one code of the PERSONALIZED promotion's pool, not two."""
    await code_promotion(api, "FLASH")
    await upload(api, "FLASH", codes_file("F", 5), "up-1")
    direct = await get_reward(api, "c1", "FLASH")
    via_campaign = await get_reward(api, "c1", "FLASH", campaign_id="reminder")
    codes = {r.grant.promo_code for r in (direct, via_campaign) if r.HasField("grant")}
    assert len(codes) == 1, codes
    assert (await pool_counts(pool, "FLASH"))[1] == 1


# --- Invariant 4: bad input gets a clear error and changes nothing --------------------------

async def test_a_refused_promotion_update_changes_nothing(api: Api) -> None:
    """An UpdatePromotion whose mask holds a good change (name) and a bad one (a budget cap
    on a reward type the promotion does not pay) is refused whole: GetPromotion and
    ListPromotions answer byte for byte as before (no new name, version or update_time)."""
    await reward_type(api)
    await promotion(api, activate=False)
    stub = ppb_grpc.PromotionServiceStub(api.channel)

    async def state() -> tuple[bytes, bytes]:
        got = await stub.GetPromotion(ppb.GetPromotionRequest(promotion_code="VIP25"),
                                      metadata=api.key())
        listed = await stub.ListPromotions(ppb.ListPromotionsRequest(), metadata=api.key())
        return (got.SerializeToString(deterministic=True),
                listed.SerializeToString(deterministic=True))

    before = await state()
    code, reason, message, metadata = await _failure(stub.UpdatePromotion(
        ppb.UpdatePromotionRequest(
            request_id="edit-1", promotion=ppb.Promotion(
                promotion_code="VIP25", name="Renamed",
                budget_caps=[cap(ppb.CAP_PERIOD_DAILY, "100", "free_spins")]),
            update_mask=field_mask_pb2.FieldMask(paths=["name", "budget_caps"])),
        metadata=api.key()))
    assert (code, reason) == ("INVALID_ARGUMENT", "INVALID_CAP")
    assert "free_spins" in message and metadata.get("field") == "budget_caps[0].reward_type"
    assert await state() == before


async def test_a_refused_reward_type_update_changes_neither_it_nor_its_promotions(
        api: Api) -> None:
    """UpdateRewardType with min_value above max_value is INVALID_ARGUMENT; the reward type
    and the promotions paying it (whose version follows the type's bounds) are unchanged."""
    await reward_type(api, min_value="1", max_value="50")
    await promotion(api)
    stub = rtpb_grpc.RewardTypeServiceStub(api.channel)
    before = (await stub.GetRewardType(rtpb.GetRewardTypeRequest(name="cashback"),
                                       metadata=api.key()), await get_promotion(api))
    code, reason, message, _ = await _failure(stub.UpdateRewardType(rtpb.UpdateRewardTypeRequest(
        request_id="bounds-1", reward_type=rtpb.RewardType(
            name="cashback", display_name="New", min_value="60"),
        update_mask=field_mask_pb2.FieldMask(paths=["display_name", "min_value"])),
        metadata=api.key()))
    assert code == "INVALID_ARGUMENT" and reason and "60" in message
    after = (await stub.GetRewardType(rtpb.GetRewardTypeRequest(name="cashback"),
                                      metadata=api.key()), await get_promotion(api))
    assert after == before


async def test_a_refused_bonus_formula_edit_points_at_line_and_column_and_changes_nothing(
        api: Api) -> None:
    """UpdateBonusDefinition with a formula broken on its second line: INVALID_ARGUMENT with
    the line and column in the message and the ErrorInfo; the definition (formula, revision,
    update_time) is unchanged."""
    stub = bpb_grpc.BonusServiceStub(api.channel)
    definition = bpb.BonusDefinition(
        definition_id="deposits-10", display_name="Deposits", formula="sum(deposit.amount) * 10%",
        result_type=bpb.BONUS_RESULT_TYPE_AMOUNT,
        data_mode=bpb.BONUS_DATA_MODE_TRANSACTIONS_AND_PROPERTIES,
        period=fpb.TransactionPeriod(time_back=fpb.TransactionPeriod.TimeBack(
            amount=1, unit=fpb.TIME_UNIT_DAYS)),
        approval_mode=bpb.APPROVAL_MODE_MANUAL)
    await stub.CreateBonusDefinition(bpb.CreateBonusDefinitionRequest(
        request_id="create-d", definition=definition), metadata=api.key())
    before = await stub.GetBonusDefinition(bpb.GetBonusDefinitionRequest(
        definition_id="deposits-10"), metadata=api.key())
    code, reason, message, metadata = await _failure(stub.UpdateBonusDefinition(
        bpb.UpdateBonusDefinitionRequest(
            request_id="edit-d", definition=bpb.BonusDefinition(
                definition_id="deposits-10", display_name="Renamed",
                formula="x = sum(deposit.amount)\ny = x *\n"),
            update_mask=field_mask_pb2.FieldMask(paths=["display_name", "formula"])),
        metadata=api.key()))
    assert code == "INVALID_ARGUMENT" and reason in ("FORMULA_SYNTAX", "FORMULA_INVALID")
    assert metadata.get("line") == "2" and metadata.get("column")
    assert f"line 2, column {metadata['column']}" in message
    after = await stub.GetBonusDefinition(bpb.GetBonusDefinitionRequest(
        definition_id="deposits-10"), metadata=api.key())
    assert after == before


async def test_a_refused_create_leaves_no_trace(api: Api, pool: asyncpg.Pool) -> None:
    """CreatePromotion whose second reward names an unknown reward type is refused with the
    field named; nothing is stored (no promotion, no counters) and the code stays free."""
    await reward_type(api)
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    bad = ppb.CreatePromotionRequest(request_id="p-1", activate=True, promotion=ppb.Promotion(
        promotion_code="VIP25", name="VIP", rewards=[
            ppb.PromotionReward(reward_type="cashback", kind=ppb.REWARD_KIND_SINGLE, value="5"),
            ppb.PromotionReward(reward_type="ghost", kind=ppb.REWARD_KIND_SINGLE, value="5")],
        budget_caps=[cap(ppb.CAP_PERIOD_DAILY, "100")]))
    code, reason, message, metadata = await _failure(stub.CreatePromotion(bad,
                                                                          metadata=api.key()))
    assert code in ("INVALID_ARGUMENT", "NOT_FOUND", "FAILED_PRECONDITION")
    assert reason == "REWARD_TYPE_NOT_FOUND" and "ghost" in message
    assert metadata.get("field") == "rewards[1].reward_type"
    assert (await stub.ListPromotions(ppb.ListPromotionsRequest(),
                                      metadata=api.key())).promotions == []
    assert await pool.fetchval("SELECT count(*) FROM promotions") == 0
    created = await promotion(api, "VIP25")
    assert created.status == ppb.PROMOTION_STATUS_ACTIVE


async def test_every_refusal_carries_a_reason_and_an_actionable_message(
        api: Api, clock: FixedClock) -> None:
    """Invariant 4 across services: each kind of bad input (ids, states, decimals, time zones,
    periods, page tokens, formulas) is INVALID_ARGUMENT / FAILED_PRECONDITION / NOT_FOUND with
    an ErrorInfo in the promo.engine domain whose reason is UPPER_SNAKE, and a message that
    says more than the reason."""
    await reward_type(api)
    await promotion(api)
    promos = ppb_grpc.PromotionServiceStub(api.channel)
    types = rtpb_grpc.RewardTypeServiceStub(api.channel)
    rewards = rpb_grpc.RewardServiceStub(api.channel)
    campaigns = cpb_grpc.CampaignServiceStub(api.channel)
    customers = custpb_grpc.CustomerServiceStub(api.channel)
    formulas = fpb_grpc.FormulaServiceStub(api.channel)
    admin = api.key()
    calls: dict[str, Callable[[], Awaitable[object]]] = {
        "edit an ACTIVE promotion": lambda: promos.UpdatePromotion(ppb.UpdatePromotionRequest(
            request_id="u1", promotion=ppb.Promotion(promotion_code="VIP25", name="X"),
            update_mask=field_mask_pb2.FieldMask(paths=["name"])), metadata=admin),
        "activate twice": lambda: promos.ActivatePromotion(ppb.ActivatePromotionRequest(
            request_id="a1", promotion_code="VIP25"), metadata=admin),
        "unknown promotion": lambda: promos.GetPromotion(ppb.GetPromotionRequest(
            promotion_code="NOPE"), metadata=admin),
        "float-looking decimal": lambda: types.CreateRewardType(rtpb.CreateRewardTypeRequest(
            request_id="t1", reward_type=rtpb.RewardType(
                name="spins", display_name="Spins", category=rtpb.REWARD_CATEGORY_UNITS,
                max_value="NaN")), metadata=admin),
        "bad time zone": lambda: promos.CreatePromotion(ppb.CreatePromotionRequest(
            request_id="p2", promotion=ppb.Promotion(
                promotion_code="TZ", name="TZ", time_zone="Europe/Berlln",
                rewards=[ppb.PromotionReward(reward_type="cashback",
                                             kind=ppb.REWARD_KIND_SINGLE, value="1")])),
            metadata=admin),
        "unknown grant": lambda: rewards.RevokeGrant(rpb.RevokeGrantRequest(
            request_id="r1", grant_id="999999"), metadata=api.key("runtime")),
        "campaign in the past": lambda: campaigns.CreateCampaign(cpb.CreateCampaignRequest(
            request_id="c1", customer_ids=["c1"], campaign=cpb.Campaign(
                campaign_id="late", name="Late", promotion_codes=["VIP25"],
                execute_at=ts(clock.now() - timedelta(hours=1)))), metadata=admin),
        "edited page token": lambda: types.ListRewardTypes(rtpb.ListRewardTypesRequest(
            page_token="not-a-token"), metadata=admin),
        "event in the future": lambda: customers.RecordEvents(custpb.RecordEventsRequest(
            request_id="e1", create_missing_customers=True, events=[custpb.Event(
                external_id="x1", customer_id="c1", kind="deposit", amount="10",
                currency="EUR", occurred_at=ts(clock.now() + timedelta(days=1)))]),
            metadata=api.key("runtime")),
        "period too long": lambda: formulas.DryRunFormula(fpb.DryRunFormulaRequest(
            source="sum(deposit.amount)", customer_id="c1", period=fpb.TransactionPeriod(
                time_back=fpb.TransactionPeriod.TimeBack(amount=32, unit=fpb.TIME_UNIT_DAYS))),
            metadata=admin),
        "formula type error": lambda: formulas.ValidateFormula(fpb.ValidateFormulaRequest(
            source='sum(deposit.amount) * "ten"'), metadata=admin),
    }
    problems: dict[str, object] = {}
    for name, call in calls.items():
        code, reason, message, _ = await _failure(call())
        if code not in ("INVALID_ARGUMENT", "FAILED_PRECONDITION", "NOT_FOUND") \
                or not reason or not re.fullmatch(r"[A-Z][A-Z0-9_]+", reason) \
                or len(message) < 15 or message.strip() == reason:
            problems[name] = (code, reason, message[:200])
    assert problems == {}


@pytest.mark.parametrize("zone", ["Europe/Berlin ", "europe/berlin", "Europe", "+02:00",
                                  "../zoneinfo/UTC"])
async def test_a_name_that_is_no_time_zone_is_refused_and_nothing_is_created(
        api: Api, zone: str) -> None:
    """Invariant 6 / 4: a cap period needs a named IANA zone; a name that is not one is
    INVALID_ARGUMENT INVALID_TIME_ZONE naming the field, and no promotion is created."""
    await reward_type(api)
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    code, reason, message, metadata = await _failure(stub.CreatePromotion(
        ppb.CreatePromotionRequest(request_id="p-tz", promotion=ppb.Promotion(
            promotion_code="TZ", name="TZ", time_zone=zone, rewards=[ppb.PromotionReward(
                reward_type="cashback", kind=ppb.REWARD_KIND_SINGLE, value="1")])),
        metadata=api.key()))
    assert (code, reason) == ("INVALID_ARGUMENT", "INVALID_TIME_ZONE"), (code, reason, message)
    assert metadata.get("field") == "time_zone" and "time_zone" in message
    assert (await stub.ListPromotions(ppb.ListPromotionsRequest(),
                                      metadata=api.key())).promotions == []


async def test_the_hosts_local_zone_is_not_a_named_time_zone(api: Api) -> None:
    """Invariant 6: "Every period boundary has a named time zone". "localtime" is a file in
    the server's zoneinfo folder (a link to /etc/localtime), not an IANA zone: its boundaries
    would move with the host's configuration, so it is refused like any unknown name. An
    empty zone is stored as the explicit "UTC"."""
    await reward_type(api)
    stub = ppb_grpc.PromotionServiceStub(api.channel)

    def create(code: str, zone: str) -> Awaitable[ppb.CreatePromotionResponse]:
        return stub.CreatePromotion(ppb.CreatePromotionRequest(
            request_id=f"p-{code}", promotion=ppb.Promotion(
                promotion_code=code, name=code, time_zone=zone, rewards=[ppb.PromotionReward(
                    reward_type="cashback", kind=ppb.REWARD_KIND_SINGLE, value="1")])),
            metadata=api.key())

    assert (await create("DEFAULT", "")).promotion.time_zone == "UTC"
    outcome = await _failure(create("HOST", "localtime"))
    assert outcome[:2] == ("INVALID_ARGUMENT", "INVALID_TIME_ZONE"), outcome


# --- Invariant 5: money is exact ------------------------------------------------------------

async def test_tenths_add_up_to_the_cap_exactly(api: Api) -> None:
    """0.1 + 0.1 + 0.1 is 0.3 (in floats it is 0.30000000000000004 > 0.3): with a reward of
    0.1 and a lifetime cap of 0.3, exactly three grants fit, the cap usage says 0.3 of 0.3,
    reached, and the reconciliation agrees."""
    await reward_type(api)
    await promotion(api, rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_SINGLE, value="0.1")],
        caps=[cap(ppb.CAP_PERIOD_LIFETIME, "0.3")])
    replies = [await get_reward(api, f"c{i}") for i in range(4)]
    assert [r.HasField("grant") for r in replies] == [True, True, True, False]
    assert replies[3].denial_reason == rpb.DENIAL_REASON_BUDGET_CAP_REACHED
    assert {r.grant.rewards[0].value for r in replies[:3]} == {"0.1"}
    [usage] = [u for u in (await get_promotion(api)).cap_usage if u.scope == "cashback"]
    assert (usage.used, usage.limit, usage.reached, usage.grants) == ("0.3", "0.3", True, 3)
    recon = await ppb_grpc.PromotionServiceStub(api.channel).GetPromotionReconciliation(
        ppb.GetPromotionReconciliationRequest(promotion_code="VIP25"), metadata=api.key())
    [row] = [r for r in recon.rows if r.scope == "cashback"]
    assert (Decimal(row.granted_amount), Decimal(row.net_amount), row.counter_matches) == (
        Decimal("0.3"), Decimal("0.3"), True)
    assert _plain_decimal(row.net_amount) and _plain_decimal(row.granted_amount)


@pytest.mark.parametrize("value", ["0.000001", "0.00001", "99999999999999.999999", "100",
                                   "1e2", "12345678901234.5"])
async def test_extreme_amounts_round_trip_exactly(api: Api, value: str) -> None:
    """An amount with 20 significant digits, the smallest step (0.000001), and numbers a
    float or Decimal.normalize() would print in exponent form (1E-5, 1E+2) come back as the
    same number in plain notation: in the reward type's bounds, the promotion's reward, the
    grant, the cap usage and the listing."""
    await reward_type(api, max_value=value)
    stub = rtpb_grpc.RewardTypeServiceStub(api.channel)
    got = (await stub.GetRewardType(rtpb.GetRewardTypeRequest(name="cashback"),
                                    metadata=api.key())).reward_type
    listed = (await stub.ListRewardTypes(rtpb.ListRewardTypesRequest(),
                                         metadata=api.key())).reward_types[0]
    await promotion(api, rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_SINGLE, value=value)],
        caps=[cap(ppb.CAP_PERIOD_LIFETIME, value), cap(ppb.CAP_PERIOD_DAILY, value)])
    granted = await get_reward(api, "c1")
    state = await get_promotion(api)
    texts = {
        "reward type max_value": got.max_value,
        "listed max_value": listed.max_value,
        "promotion reward value": state.rewards[0].value,
        "grant value": granted.grant.rewards[0].value,
        **{f"cap {u.period} used": u.used for u in state.cap_usage},
        **{f"cap {u.period} limit": u.limit for u in state.cap_usage},
        **{f"budget cap {c.period} limit": c.limit for c in state.budget_caps},
    }
    wrong = {k: v for k, v in texts.items()
             if not _plain_decimal(v) or Decimal(v) != Decimal(value)}
    assert wrong == {}


@pytest.mark.parametrize("value", ["1e2", "0.000001", "99999999999999.999999", "2.50"])
async def test_external_values_are_charged_and_echoed_exactly(api: Api, value: str) -> None:
    """An EXTERNAL reward's value passed in GetReward.external_values is charged to the cap
    and echoed in the grant as the same number in plain decimal notation (README: amounts
    are decimal strings such as "10.50"; "1e2" is accepted input, "1E+2" is no amount a
    promotion system should have to parse back)."""
    await reward_type(api)
    await promotion(api, rewards=[ppb.PromotionReward(reward_type="cashback",
                                                      kind=ppb.REWARD_KIND_EXTERNAL)],
                    caps=[cap(ppb.CAP_PERIOD_LIFETIME, "99999999999999.999999")])
    granted = await get_reward(api, "c1", external_values={"cashback": value})
    retry = await get_reward(api, "c1", external_values={"cashback": value},
                             request_id="retry-" + granted.grant.grant_id)
    [usage] = (await get_promotion(api)).cap_usage
    texts = {"grant value": granted.grant.rewards[0].value,
             "existing grant value": retry.grant.rewards[0].value, "cap used": usage.used}
    wrong = {k: v for k, v in texts.items()
             if not _plain_decimal(v) or Decimal(v) != Decimal(value)}
    assert wrong == {}


async def test_customer_amounts_round_trip_exactly(api: Api, clock: FixedClock) -> None:
    """Decimal properties and event amounts (stored as JSON numbers and NUMERIC) come back as
    the same numbers without exponents or float rounding."""
    values = ["0.000001", "-0.000001", "99999999999999.999999", "0.1", "100", "1e3"]
    stub = custpb_grpc.CustomerServiceStub(api.channel)
    await stub.UpsertCustomers(custpb.UpsertCustomersRequest(request_id="u1", customers=[
        custpb.Customer(customer_id="c1", currency="EUR", properties={
            f"p{i}": custpb.PropertyValue(decimal_value=v) for i, v in enumerate(values)})]),
        metadata=api.key("runtime"))
    await stub.RecordEvents(custpb.RecordEventsRequest(request_id="e1", events=[
        custpb.Event(external_id=f"x{i}", customer_id="c1", kind="adjust", amount=v,
                     currency="EUR", occurred_at=ts(clock.now() - timedelta(minutes=i + 1)))
        for i, v in enumerate(values)]), metadata=api.key("runtime"))
    customer = (await stub.GetCustomer(custpb.GetCustomerRequest(customer_id="c1"),
                                       metadata=api.key())).customer
    events = (await stub.ListCustomerEvents(custpb.ListCustomerEventsRequest(
        customer_id="c1"), metadata=api.key())).events
    properties = {k: p.decimal_value for k, p in customer.properties.items()}
    amounts = {e.external_id: e.amount for e in events}
    wrong = {f"property p{i}": properties[f"p{i}"] for i, v in enumerate(values)
             if not _plain_decimal(properties[f"p{i}"])
             or Decimal(properties[f"p{i}"]) != Decimal(v)}
    wrong |= {f"event x{i}": amounts[f"x{i}"] for i, v in enumerate(values)
              if not _plain_decimal(amounts[f"x{i}"]) or Decimal(amounts[f"x{i}"]) != Decimal(v)}
    assert wrong == {}


async def test_formula_sums_of_tenths_are_exact(api: Api, clock: FixedClock) -> None:
    """A formula over ten deposits of 0.1 and one of 0.2 sums to exactly 1.2 (floats give
    1.2000000000000002), and a threshold on that sum behaves as a person expects."""
    stub = custpb_grpc.CustomerServiceStub(api.channel)
    amounts = ["0.1"] * 10 + ["0.2"]
    await stub.RecordEvents(custpb.RecordEventsRequest(
        request_id="e1", create_missing_customers=True, events=[
            custpb.Event(external_id=f"d{i}", customer_id="c1", kind="deposit", amount=a,
                         currency="EUR", occurred_at=ts(clock.now() - timedelta(minutes=i + 1)))
            for i, a in enumerate(amounts)]), metadata=api.key("runtime"))
    formulas = fpb_grpc.FormulaServiceStub(api.channel)
    period = fpb.TransactionPeriod(time_back=fpb.TransactionPeriod.TimeBack(
        amount=1, unit=fpb.TIME_UNIT_DAYS))
    reply = await formulas.DryRunFormula(fpb.DryRunFormulaRequest(
        source="if sum(deposit.amount) == 1.2 then sum(deposit.amount) * 3 else 7",
        customer_id="c1", period=period), metadata=api.key())
    assert reply.outcome == fpb.DRY_RUN_OUTCOME_AMOUNT
    assert Decimal(reply.amount) == Decimal("3.6") and _plain_decimal(reply.amount)
    assert [Decimal(a.value) for a in reply.aggregates] == [Decimal("1.2")]


async def test_forecast_of_tenths_fits_a_cap_of_their_sum(api: Api, clock: FixedClock) -> None:
    """ForecastCampaign: three approvals of 0.1 against a lifetime cap of 0.3 project 0.3,
    leave exactly 0 and fit."""
    await reward_type(api)
    await promotion(api, rewards=[ppb.PromotionReward(
        reward_type="cashback", kind=ppb.REWARD_KIND_SINGLE, value="0.1")],
        caps=[cap(ppb.CAP_PERIOD_LIFETIME, "0.3")])
    await create_campaign(api, "spring", clock.now() + timedelta(hours=2),
                          customers=["c1", "c2", "c3"], conditional=False)
    forecast = await cpb_grpc.ClearanceServiceStub(api.channel).ForecastCampaign(
        cpb.ForecastCampaignRequest(campaign_id="spring"), metadata=api.key("listener"))
    [promo] = forecast.promotions
    assert Decimal(promo.projected_value["cashback"]) == Decimal("0.3")
    [limit] = [c for c in promo.caps if c.scope == "cashback"]
    assert (Decimal(limit.projected), Decimal(limit.remaining_after), limit.fits) == (
        Decimal("0.3"), Decimal(0), True)
    assert all(_plain_decimal(t) for c in promo.caps
               for t in (c.limit, c.used, c.projected, c.remaining_after))
    assert forecast.fits


# --- Invariant 6: time is explicit ----------------------------------------------------------

def _utc(text: str) -> datetime:
    return datetime.fromisoformat(text).astimezone(UTC)


def _window(usage: ppb.CapUsage) -> tuple[datetime, datetime]:
    return usage.period_start.ToDatetime(UTC), usage.period_end.ToDatetime(UTC)


async def test_the_25_hour_day_in_berlin_is_one_daily_window(
        api: Api, clock: FixedClock) -> None:
    """DST ends in Europe/Berlin on 2026-10-25 (03:00 CEST -> 02:00 CET): that local day is
    25 hours long, 2026-10-24T22:00Z to 2026-10-25T23:00Z. A daily cap that fits one grant
    holds for all 25 hours (an engine adding 24 h would reopen it at 22:00Z) and reopens at
    the local midnight, not an hour early or late."""
    clock.set(_utc("2026-10-24T12:00:00+00:00"))
    await reward_type(api)
    await promotion(api, time_zone="Europe/Berlin", caps=[cap(ppb.CAP_PERIOD_DAILY, "15")])
    clock.set(_utc("2026-10-25T00:00:00+02:00"))  # local midnight, 2026-10-24T22:00Z
    assert (await get_reward(api, "a")).HasField("grant")
    [usage] = (await get_promotion(api)).cap_usage
    assert _window(usage) == (_utc("2026-10-24T22:00:00+00:00"),
                              _utc("2026-10-25T23:00:00+00:00"))
    for at in ("2026-10-25T22:00:00+00:00", "2026-10-25T22:59:59+00:00"):  # 23:00, 23:59 CET
        clock.set(_utc(at))
        assert not (await get_reward(api, "b")).HasField("grant"), at
    clock.set(_utc("2026-10-25T23:00:00+00:00"))  # 2026-10-26 00:00 CET
    assert (await get_reward(api, "b")).HasField("grant")
    [usage] = (await get_promotion(api)).cap_usage
    assert _window(usage) == (_utc("2026-10-25T23:00:00+00:00"),
                              _utc("2026-10-26T23:00:00+00:00"))
    assert (usage.used, usage.grants) == ("15", 1)


async def test_weekly_and_monthly_windows_span_a_dst_change_in_local_time(
        api: Api, clock: FixedClock) -> None:
    """Weekly (ISO, Monday) and monthly windows in Europe/Berlin run from local midnight to
    local midnight: the week of 2026-10-19 is 7 days and 1 hour long, March 2026 is 31 days
    less 1 hour; the first instant of April (2026-03-31T22:00Z) is in the next month."""
    clock.set(_utc("2026-03-01T00:00:00+01:00"))
    await reward_type(api)
    await promotion(api, time_zone="Europe/Berlin",
                    caps=[cap(ppb.CAP_PERIOD_WEEKLY, "1000"), cap(ppb.CAP_PERIOD_MONTHLY, "15")])
    assert (await get_reward(api, "a")).HasField("grant")
    clock.set(_utc("2026-03-31T23:59:59+02:00"))
    assert not (await get_reward(api, "b")).HasField("grant")
    monthly = next(u for u in (await get_promotion(api)).cap_usage
                   if u.period == ppb.CAP_PERIOD_MONTHLY)
    assert _window(monthly) == (_utc("2026-02-28T23:00:00+00:00"),
                                _utc("2026-03-31T22:00:00+00:00"))
    clock.set(_utc("2026-04-01T00:00:00+02:00"))
    assert (await get_reward(api, "b")).HasField("grant")
    clock.set(_utc("2026-10-25T12:00:00+00:00"))  # Sunday
    windows = {u.period: _window(u) for u in (await get_promotion(api)).cap_usage}
    assert windows == {
        ppb.CAP_PERIOD_WEEKLY: (_utc("2026-10-19T00:00:00+02:00"),
                                _utc("2026-10-26T00:00:00+01:00")),
        ppb.CAP_PERIOD_MONTHLY: (_utc("2026-10-01T00:00:00+02:00"),
                                 _utc("2026-11-01T00:00:00+01:00")),
    }


async def test_a_day_whose_midnight_does_not_exist_still_has_one_window(
        api: Api, clock: FixedClock) -> None:
    """America/Santiago skips from 2026-09-05 24:00 (-04) to 2026-09-06 01:00 (-03): local
    midnight never happens. Sep 5 ends and Sep 6 begins at the transition (04:00Z); Sep 6 is
    23 hours long. Daily windows tile: no hour is lost, none is counted twice."""
    clock.set(_utc("2026-09-05T12:00:00+00:00"))
    await reward_type(api)
    await promotion(api, time_zone="America/Santiago", caps=[cap(ppb.CAP_PERIOD_DAILY, "15")])
    clock.set(_utc("2026-09-06T03:59:00+00:00"))  # 23:59 on Sep 5, local
    assert (await get_reward(api, "a")).HasField("grant")
    [usage] = (await get_promotion(api)).cap_usage
    assert _window(usage) == (_utc("2026-09-05T04:00:00+00:00"),
                              _utc("2026-09-06T04:00:00+00:00"))
    clock.set(_utc("2026-09-06T04:00:00+00:00"))  # 01:00 on Sep 6, local (-03)
    assert (await get_reward(api, "b")).HasField("grant")
    [usage] = (await get_promotion(api)).cap_usage
    assert _window(usage) == (_utc("2026-09-06T04:00:00+00:00"),
                              _utc("2026-09-07T03:00:00+00:00"))
    clock.set(_utc("2026-09-07T02:59:59+00:00"))
    assert not (await get_reward(api, "c")).HasField("grant")


async def test_a_forecast_uses_the_window_of_the_execution_time_across_dst(
        api: Api, clock: FixedClock) -> None:
    """ForecastCampaign counts periodic caps in the window that holds the campaign's
    execution, in the promotion's zone: at 23:30 CET on 2026-10-25 (the 25-hour day), a
    campaign at 00:30 CET the next day sees an empty daily window; one at 23:50 the same day
    sees today's spend (an engine adding 24 h to the day's start would swap them)."""
    clock.set(_utc("2026-10-25T00:30:00+02:00"))
    await reward_type(api)
    await promotion(api, time_zone="Europe/Berlin", caps=[cap(ppb.CAP_PERIOD_DAILY, "100")])
    assert (await get_reward(api, "early")).HasField("grant")
    clock.set(_utc("2026-10-25T23:30:00+01:00"))
    await create_campaign(api, "tonight", _utc("2026-10-25T23:50:00+01:00"),
                          customers=["c1"], conditional=False)
    await create_campaign(api, "tomorrow", _utc("2026-10-26T00:30:00+01:00"),
                          customers=["c1"], conditional=False)
    stub = cpb_grpc.ClearanceServiceStub(api.channel)
    used = {}
    for campaign_id in ("tonight", "tomorrow"):
        reply = await stub.ForecastCampaign(cpb.ForecastCampaignRequest(
            campaign_id=campaign_id), metadata=api.key("listener"))
        [daily] = [c for c in reply.promotions[0].caps if c.period == ppb.CAP_PERIOD_DAILY]
        used[campaign_id] = Decimal(daily.used)
    assert used == {"tonight": Decimal(15), "tomorrow": Decimal(0)}


async def test_a_daily_schedule_neither_drops_nor_doubles_a_dst_day(
        api: Api, clock: FixedClock, pool: asyncpg.Pool, settings: Settings) -> None:
    """A daily bonus schedule at 02:30 Europe/Berlin. On 2026-03-29 02:30 does not exist
    (02:00 CET -> 03:00 CEST): that day still gets its run (between 01:00Z and 02:00Z). On
    2026-10-25 02:30 happens twice (00:30Z CEST, 01:30Z CET): it runs once, at the first, and
    the next run is 2026-10-26 02:30 CET."""
    stub = bpb_grpc.BonusServiceStub(api.channel)
    await stub.CreateBonusDefinition(bpb.CreateBonusDefinitionRequest(
        request_id="create-d", definition=bpb.BonusDefinition(
            definition_id="daily", display_name="Daily", formula="sum(deposit.amount) * 10%",
            result_type=bpb.BONUS_RESULT_TYPE_AMOUNT,
            data_mode=bpb.BONUS_DATA_MODE_TRANSACTIONS_AND_PROPERTIES,
            period=fpb.TransactionPeriod(time_back=fpb.TransactionPeriod.TimeBack(
                amount=1, unit=fpb.TIME_UNIT_DAYS)),
            approval_mode=bpb.APPROVAL_MODE_MANUAL)), metadata=api.key())
    await custpb_grpc.CustomerServiceStub(api.channel).UpsertCustomers(
        custpb.UpsertCustomersRequest(request_id="u1", customers=[
            custpb.Customer(customer_id="c1")]), metadata=api.key("runtime"))

    async def create(schedule_id: str) -> datetime:
        reply = await stub.CreateBonusSchedule(bpb.CreateBonusScheduleRequest(
            request_id=f"s-{schedule_id}", schedule=bpb.BonusSchedule(
                schedule_id=schedule_id, definition_id="daily", customer_ids=["c1"],
                local_time="02:30", time_zone="Europe/Berlin")), metadata=api.key())
        return reply.schedule.next_run_time.ToDatetime(UTC)

    async def autumn() -> bpb.BonusSchedule:
        listed = await stub.ListBonusSchedules(bpb.ListBonusSchedulesRequest(),
                                               metadata=api.key())
        return next(s for s in listed.schedules if s.schedule_id == "autumn")

    clock.set(_utc("2026-03-28T12:00:00+00:00"))
    spring = await create("spring")
    assert _utc("2026-03-29T01:00:00+00:00") <= spring <= _utc("2026-03-29T02:00:00+00:00")
    clock.set(_utc("2026-10-24T12:00:00+00:00"))
    assert await create("autumn") == _utc("2026-10-25T02:30:00+02:00")
    sweep = {"pool": pool, "clock": clock, "settings": settings}
    clock.set(_utc("2026-10-25T00:30:30+00:00"))
    await run_due_schedules(sweep)
    ran = await autumn()
    assert ran.last_run_time.ToDatetime(UTC) == _utc("2026-10-25T02:30:00+02:00")
    assert ran.next_run_time.ToDatetime(UTC) == _utc("2026-10-26T02:30:00+01:00")
    clock.set(_utc("2026-10-25T01:30:30+00:00"))  # 02:30 CET, the repeated hour
    await run_due_schedules(sweep)
    assert await autumn() == ran


@pytest.mark.parametrize(("zone", "now", "start", "end"), [
    ("Europe/Berlin", "2026-10-26T10:00:00+00:00", "2026-10-24T22:00:00+00:00",
     "2026-10-25T23:00:00+00:00"),
    ("America/Santiago", "2026-09-07T12:00:00+00:00", "2026-09-06T04:00:00+00:00",
     "2026-09-07T03:00:00+00:00"),
], ids=["berlin-25h", "santiago-23h"])
async def test_yesterday_in_the_customers_own_zone_spans_its_dst_day(
        api: Api, clock: FixedClock, zone: str, now: str, start: str, end: str) -> None:
    """Invariant 6, "the customer's own" zone: RELATIVE_KIND_LAST_FULL_DAY without a zone is
    the customer's yesterday, local midnight to local midnight, 25 or 23 hours on a DST day.
    Events one second inside each end count; an event at the end instant does not."""
    clock.set(_utc(now))
    stub = custpb_grpc.CustomerServiceStub(api.channel)
    await stub.UpsertCustomers(custpb.UpsertCustomersRequest(request_id="u1", customers=[
        custpb.Customer(customer_id="c1", currency="EUR", time_zone=zone)]),
        metadata=api.key("runtime"))
    moments = {"first": _utc(start), "last": _utc(end) - timedelta(seconds=1),
               "after": _utc(end), "before": _utc(start) - timedelta(seconds=1)}
    await stub.RecordEvents(custpb.RecordEventsRequest(request_id="e1", events=[
        custpb.Event(external_id=name, customer_id="c1", kind="deposit", amount=amount,
                     currency="EUR", occurred_at=ts(at))
        for (name, at), amount in zip(moments.items(), ["1", "10", "100", "1000"],
                                      strict=True)]), metadata=api.key("runtime"))
    reply = await fpb_grpc.FormulaServiceStub(api.channel).DryRunFormula(
        fpb.DryRunFormulaRequest(
            source="sum(deposit.amount)", customer_id="c1", period=fpb.TransactionPeriod(
                relative=fpb.TransactionPeriod.Relative(kind=fpb.RELATIVE_KIND_LAST_FULL_DAY))),
        metadata=api.key())
    assert (reply.window_start.ToDatetime(UTC), reply.window_end.ToDatetime(UTC)) == (
        _utc(start), _utc(end))
    assert Decimal(reply.amount) == Decimal(11)
