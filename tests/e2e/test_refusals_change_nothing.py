"""DESIGN.md invariant 4, second half: bad input "changes nothing".

tests/e2e/test_fuzz_audit.py checks that bad input never gets INTERNAL; this file checks that a
REFUSED call (any status but OK) leaves the database exactly as it was, and that it leaves no
claimed request id behind (the same request_id with the payload fixed then succeeds).

Every mutating RPC of the descriptors (a request with a ``request_id`` field) has a case here;
a new one without a case fails ``test_every_mutating_rpc_has_a_case``. Each case is run in the
world test_fuzz_audit builds (promotions with grants and caps, a code pool, a campaign with
targets, listeners and deliveries, product lists and discounts, bonus definitions with results
in the approval queue, a rule, a schedule, a dead job) with:

- the generic refusals every mutating RPC has: a caller without the role, no API key, a
  request_id reused for another payload (after that request succeeded), a request_id that is
  too long;
- refusals of its own: a bad item deep in a batch after valid ones, an unknown id inside an
  otherwise valid batch, a wrong state (e.g. approving an already-issued bonus among valid
  ones), and refusals only found after the call started writing (a unique conflict, a code
  already in the pool, an external id already stored with other content, ...).

For each refused call: the status and ErrorInfo reason are the expected ones (so the variant
really tests what it says), every row of every table of the public schema is the same before
and after (rows compared as JSON, sorted: ordered by all columns), and, where the variant has
one, the same request_id with the payload fixed is then OK. Sequences are not compared (a
refused INSERT may burn an id, which is allowed): refusals that consume ids are printed as
notes (run with ``-s`` to see them).
"""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf.message import Message

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import campaigns_pb2 as campb
from promo.v1 import codes_pb2 as codepb
from promo.v1 import customers_pb2 as custpb
from promo.v1 import jobs_pb2 as jpb
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import products_pb2 as prodpb
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import rewards_pb2 as rpb
from server.app import METHOD_ROLES
from server.errors import error_info_of
from storage import outbox as outbox_repo
from storage import webhooks as webhooks_repo
from tests.conftest import Api
from tests.e2e import test_bonuses_api as bonus_api
from tests.e2e import test_fuzz_audit as fz
from tests.e2e.campaign_helpers import ts
from tests.e2e.code_helpers import codes_file

World = fz.World
Request = Message | list[Message]
RPCS = fz.RPCS
MUTATING = sorted(name for name, rpc in RPCS.items()
                  if "request_id" in rpc.request_type.DESCRIPTOR.fields_by_name)
UNKNOWN_UUID = "5f0c6a8e-0000-4000-8000-000000000000"


# --- observing the database --------------------------------------------------------------------

Snapshot = dict[str, tuple[str, ...]]


async def snapshot(pool: asyncpg.Pool) -> Snapshot:
    """Every row of every table (plain and partitioned) of the public schema (and of any other
    schema that is not PostgreSQL's own), found in the catalogue, as JSON text sorted per table
    (that is: ordered by all columns), read in one repeatable-read snapshot."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read",
                                                        readonly=True):
        tables = [(r[0], r[1]) for r in await conn.fetch(
            """SELECT n.nspname, c.relname FROM pg_class c
                 JOIN pg_namespace n ON n.oid = c.relnamespace
                WHERE c.relkind IN ('r', 'p') AND n.nspname <> 'information_schema'
                  AND n.nspname NOT LIKE 'pg\\_%' ORDER BY 1, 2""")]
        assert any(schema == "public" for schema, _ in tables)
        found: Snapshot = {}
        for schema, table in tables:
            name = table if schema == "public" else f"{schema}.{table}"
            quoted = ".".join('"' + part.replace('"', '""') + '"' for part in (schema, table))
            rows = await conn.fetch(f"SELECT to_jsonb(t)::text FROM {quoted} t")
            found[name] = tuple(sorted(r[0] for r in rows))
        return found


async def sequences(pool: asyncpg.Pool) -> dict[str, int | None]:
    rows = await pool.fetch("SELECT sequencename, last_value FROM pg_sequences "
                            "WHERE schemaname = 'public'")
    return {r["sequencename"]: r["last_value"] for r in rows}


def table_diff(before: Snapshot, after: Snapshot) -> dict[str, tuple[list[str], list[str]]]:
    """(rows removed, rows added) per changed table; an updated row is one of each."""
    changed = {}
    for table in sorted(set(before) | set(after)):
        old, new = Counter(before.get(table, ())), Counter(after.get(table, ()))
        if old != new:
            changed[table] = (sorted((old - new).elements()), sorted((new - old).elements()))
    return changed


def show_diff(changed: dict[str, tuple[list[str], list[str]]]) -> str:
    lines = []
    for table, (removed, added) in changed.items():
        lines.append(f"    {table}: {len(removed)} row(s) removed, {len(added)} added")
        for sign, rows in (("-", removed), ("+", added)):
            lines += [f"      {sign} {row[:500]}" for row in rows[:4]]
            if len(rows) > 4:
                lines.append(f"      {sign} ... and {len(rows) - 4} more")
    return "\n".join(lines)


async def settle() -> None:
    """Let the server's background work of earlier (successful) set-up calls finish: the
    code-pool alert dispatcher and grant batch drainers write in tasks of their own."""
    for _ in range(5):
        busy = [t for t in asyncio.all_tasks() if not t.done() and getattr(
            t.get_coro(), "__qualname__", "") in ("AlertDispatcher._run", "GrantBatcher._drain")]
        if not busy:
            return
        await asyncio.gather(*busy, return_exceptions=True)


# --- calling -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    code: str
    reason: str | None = None
    details: str = ""

    def __str__(self) -> str:
        return f"{self.code} {self.reason} {self.details[:300]!r}"


async def call(w: World, name: str, request: Request, role: str) -> Outcome:
    """``role`` "none" sends no API key."""
    rpc = RPCS[name]
    metadata = (*(() if role == "none" else Api.key(role)),
                ("x-request-id", f"refusal-{uuid.uuid4().hex}"))
    try:
        if rpc.client_streaming:
            assert isinstance(request, list)

            async def messages() -> AsyncIterator[Message]:
                for message in request:
                    yield message

            await w.api.channel.stream_unary(
                rpc.path, request_serializer=rpc.request_type.SerializeToString,
                response_deserializer=rpc.response_type.FromString)(
                    messages(), metadata=metadata, timeout=fz.CALL_TIMEOUT)
        else:
            await w.api.channel.unary_unary(
                rpc.path, request_serializer=rpc.request_type.SerializeToString,
                response_deserializer=rpc.response_type.FromString)(
                    request, metadata=metadata, timeout=fz.CALL_TIMEOUT)
    except grpc.RpcError as exc:
        info = error_info_of(exc)  # type: ignore[arg-type]
        return Outcome(exc.code().name, info.reason if info else None,  # type: ignore[union-attr]
                       exc.details() or "")  # type: ignore[union-attr]
    return Outcome("OK")


def clone(request: Request) -> Request:
    if isinstance(request, list):
        return [clone(m) for m in request]  # type: ignore[misc]
    copy = type(request)()
    copy.CopyFrom(request)
    return copy


def with_rid(request: Request, request_id: str) -> Request:
    copy = clone(request)
    first = copy[0] if isinstance(copy, list) else copy
    first.request_id = request_id  # type: ignore[union-attr]
    return copy


async def ok(w: World, name: str, request: Request, role: str = "admin") -> Any:
    """A set-up call (before the snapshot) that must succeed."""
    if isinstance(request, list) or not getattr(request, "request_id", "x"):
        request = with_rid(request, fz.rid("setup"))
    return await w.ok(name, request, role)


# --- cases -------------------------------------------------------------------------------------

Build = Callable[[World, int], Awaitable[Request]]
Pair = tuple[Request, Request | None]  # (the bad request, the fixed one or None)
Prepare = Callable[[World, int, str], Awaitable[Pair]]


@dataclass(frozen=True)
class Variant:
    label: str
    prepare: Prepare  # makes what the call acts on (before the snapshot); sets the request id
    code: str
    reason: str
    role: str | None = None  # the bad call's caller (None: the case's role; "none": no key)


def v(label: str, code: str, reason: str,
      make: Callable[[World, int], Awaitable[Pair]]) -> Variant:
    """A variant whose bad and fixed requests carry the same, fresh request id."""
    async def prepare(w: World, n: int, request_id: str) -> Pair:
        bad, fixed = await make(w, n)
        return with_rid(bad, request_id), None if fixed is None else with_rid(fixed, request_id)
    return Variant(label, prepare, code, reason)


@dataclass(frozen=True)
class Case:
    rpc: str
    role: str
    valid: Build  # a valid request (no request id) that succeeds; different for each n
    variants: tuple[Variant, ...]


def generic(case: Case) -> list[Variant]:
    """The refusals every mutating RPC has."""
    roles = METHOD_ROLES[RPCS[case.rpc].path]
    wrong = next(r for r in ("runtime", "listener") if r not in roles)

    async def same(w: World, n: int, request_id: str) -> Pair:
        request = with_rid(await case.valid(w, n), request_id)
        return request, request

    async def reused(w: World, n: int, request_id: str) -> Pair:
        first = with_rid(await case.valid(w, n), request_id)
        await w.ok(case.rpc, first, case.role)
        m = w.n()
        if m % 2 == n % 2:  # some payloads alternate with the parity of n
            m = w.n()
        other = with_rid(await case.valid(w, m), request_id)
        return other, first  # "fixed": the first request again (its stored answer)

    async def too_long(w: World, n: int, request_id: str) -> Pair:
        return with_rid(await case.valid(w, n), "r" * 201), None

    return [
        Variant(f"a caller with role {wrong} only", same, "PERMISSION_DENIED", "ROLE_REQUIRED",
                role=wrong),
        Variant("no API key", same, "UNAUTHENTICATED", "MISSING_API_KEY", role="none"),
        Variant("the request_id of an earlier request, with another payload", reused,
                "INVALID_ARGUMENT", "REQUEST_ID_REUSED"),
        Variant("a request_id of 201 characters", too_long, "INVALID_ARGUMENT",
                "INVALID_REQUEST_ID"),
    ]


def mask(*paths: str) -> Any:
    return fz.mask(*paths)


# --- RewardTypeService ---------------------------------------------------------------------------

def _rt(name: str, **kw: Any) -> rtpb.RewardType:
    kw.setdefault("category", rtpb.REWARD_CATEGORY_UNITS)
    kw.setdefault("display_name", name.title())
    return rtpb.RewardType(name=name, **kw)


async def _create_rt(w: World, n: int) -> Request:
    return rtpb.CreateRewardTypeRequest(reward_type=_rt(f"rt{n}", min_value="1",
                                                        max_value="100"))


async def _update_rt(w: World, n: int) -> Request:
    return rtpb.UpdateRewardTypeRequest(reward_type=_rt("rt-upd", display_name=f"Upd {n}"),
                                        update_mask=mask("display_name"))


def _create_rt_bad(**kw: Any) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        fields: dict[str, Any] = {"name": f"rt{n}", "min_value": "1", "max_value": "100", **kw}
        return (rtpb.CreateRewardTypeRequest(reward_type=_rt(**fields)),
                await _create_rt(w, n))
    return make


def _update_rt_bad(name: str, paths: tuple[str, ...], **kw: Any
                   ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        message = rtpb.RewardType(name=name, **kw)
        return (rtpb.UpdateRewardTypeRequest(reward_type=message, update_mask=mask(*paths)),
                await _update_rt(w, n))
    return make


REWARD_TYPE_CASES = [
    Case("RewardTypeService/CreateRewardType", "admin", _create_rt, (
        v("the name of an existing reward type (unique conflict of the INSERT)",
          "ALREADY_EXISTS", "REWARD_TYPE_EXISTS", _create_rt_bad(name="cashback")),
        v("min_value above max_value", "INVALID_ARGUMENT", "INVALID_BOUNDS",
          _create_rt_bad(min_value="100", max_value="1")),
        v("max_value '1_000'", "INVALID_ARGUMENT", "INVALID_DECIMAL",
          _create_rt_bad(max_value="1_000")),
        v("category unspecified", "INVALID_ARGUMENT", "INVALID_CATEGORY",
          _create_rt_bad(category=rtpb.REWARD_CATEGORY_UNSPECIFIED)),
    )),
    Case("RewardTypeService/UpdateRewardType", "admin", _update_rt, (
        v("an unknown reward type", "NOT_FOUND", "REWARD_TYPE_NOT_FOUND",
          _update_rt_bad("no-such-type", ("display_name",), display_name="X",
                         category=rtpb.REWARD_CATEGORY_UNITS)),
        v("min_value above the STORED max_value (only the merge shows it)", "INVALID_ARGUMENT",
          "INVALID_BOUNDS", _update_rt_bad("rt-upd", ("min_value",), min_value="5000")),
        v("cashback (paid by VIP25 and CALC, whose versions an update bumps): min_value "
          "above max_value", "INVALID_ARGUMENT", "INVALID_BOUNDS", _update_rt_bad(
              "cashback", ("min_value", "max_value"), min_value="10", max_value="5",
              category=rtpb.REWARD_CATEGORY_AMOUNT)),
        v("category named in the mask but unset", "INVALID_ARGUMENT", "INVALID_CATEGORY",
          _update_rt_bad("rt-upd", ("category",))),
        v("the mask names the name", "INVALID_ARGUMENT", "INVALID_UPDATE_MASK",
          _update_rt_bad("rt-upd", ("name",), category=rtpb.REWARD_CATEGORY_UNITS)),
    )),
]


# --- PromotionService --------------------------------------------------------------------------

async def _create_promotion(w: World, n: int) -> Request:
    return ppb.CreatePromotionRequest(promotion=fz.vip_promotion(f"NEW{n}"), activate=True)


def _create_promotion_bad(edit: Callable[[ppb.Promotion, int], object]
                          ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        promotion = fz.vip_promotion(f"NEW{n}")
        edit(promotion, n)
        return (ppb.CreatePromotionRequest(promotion=promotion, activate=True),
                await _create_promotion(w, n))
    return make


def _code_of(promotion: ppb.Promotion, n: int) -> None:
    promotion.promotion_code = "VIP25"


def _third_reward_unknown(promotion: ppb.Promotion, n: int) -> None:
    promotion.rewards.append(ppb.PromotionReward(reward_type="no_such_type",
                                                 kind=ppb.REWARD_KIND_SINGLE, value="1"))


def _last_cap_negative(promotion: ppb.Promotion, n: int) -> None:
    promotion.budget_caps.append(ppb.BudgetCap(reward_type="cashback",
                                               period=ppb.CAP_PERIOD_WEEKLY, limit="-5"))


def _value_above_type_maximum(promotion: ppb.Promotion, n: int) -> None:
    promotion.rewards.append(ppb.PromotionReward(reward_type="rt-upd",
                                                 kind=ppb.REWARD_KIND_SINGLE, value="5000"))


def _formula_broken(promotion: ppb.Promotion, n: int) -> None:
    promotion.rewards.append(ppb.PromotionReward(
        reward_type="spins", kind=ppb.REWARD_KIND_CALCULATED, formula="last(deposit.amount) *",
        rounding=ppb.ROUNDING_MODE_ROUND_DOWN, decimals=0))


async def _update_promotion(w: World, n: int) -> Request:
    return ppb.UpdatePromotionRequest(promotion=ppb.Promotion(promotion_code="DRAFTP",
                                                              name=f"Renamed {n}"),
                                      update_mask=mask("name"))


def _update_promotion_bad(promotion: ppb.Promotion, *paths: str
                          ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return (ppb.UpdatePromotionRequest(promotion=promotion, update_mask=mask(*paths)),
                await _update_promotion(w, n))
    return make


async def _fallback_in_pool(w: World, n: int) -> Pair:
    """A deactivated PERSONALIZED promotion with codes: its fallback code set to one of them."""
    code = f"FB{n}"
    await fz.create_promotion(w, ppb.Promotion(
        promotion_code=code, name=code, code_type=ppb.CODE_TYPE_PERSONALIZED,
        rewards=[ppb.PromotionReward(reward_type="percent_off", kind=ppb.REWARD_KIND_EXTERNAL)]),
        activate=True)
    await ok(w, "CodePoolService/UploadCodes", [codepb.UploadCodesRequest(
        promotion_code=code, data=codes_file(code, 3))])
    await ok(w, "PromotionService/DeactivatePromotion",
             ppb.DeactivatePromotionRequest(promotion_code=code))
    return (ppb.UpdatePromotionRequest(promotion=ppb.Promotion(
                promotion_code=code, fallback_code=f"{code}-000002"),
                update_mask=mask("fallback_code")),
            ppb.UpdatePromotionRequest(promotion=ppb.Promotion(
                promotion_code=code, fallback_code=f"SHARED-{n}"),
                update_mask=mask("fallback_code")))


async def _draft(w: World, code: str, promotion: ppb.Promotion | None = None) -> None:
    await fz.create_promotion(w, promotion or fz.vip_promotion(code), activate=False)


async def _activate(w: World, n: int) -> Request:
    await _draft(w, f"ACT{n}")
    return ppb.ActivatePromotionRequest(promotion_code=f"ACT{n}")


async def _deactivate(w: World, n: int) -> Request:
    await fz.create_promotion(w, fz.vip_promotion(f"DEA{n}"), activate=True)
    return ppb.DeactivatePromotionRequest(promotion_code=f"DEA{n}")


def _transition_bad(build: Build, rpc_request: Any, code: str,
                    setup: Callable[[World, int], Awaitable[str]] | None = None
                    ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        target = await setup(w, n) if setup else code
        fixed = await build(w, n)
        return rpc_request(promotion_code=target), fixed
    return make


async def _lowered_type_maximum(w: World, n: int) -> str:
    """A DRAFT promotion paying 50 of a reward type whose maximum was then lowered to 10."""
    name = f"rtx{n}"
    await ok(w, "RewardTypeService/CreateRewardType", rtpb.CreateRewardTypeRequest(
        reward_type=_rt(name, min_value="1", max_value="100")))
    await _draft(w, f"AX{n}", ppb.Promotion(
        promotion_code=f"AX{n}", name=f"AX{n}", rewards=[ppb.PromotionReward(
            reward_type=name, kind=ppb.REWARD_KIND_SINGLE, value="50")]))
    await ok(w, "RewardTypeService/UpdateRewardType", rtpb.UpdateRewardTypeRequest(
        reward_type=_rt(name, max_value="10"), update_mask=mask("max_value")))
    return f"AX{n}"


async def _deactivated(w: World, n: int) -> str:
    await fz.create_promotion(w, fz.vip_promotion(f"OFF{n}"), activate=True)
    await ok(w, "PromotionService/DeactivatePromotion",
             ppb.DeactivatePromotionRequest(promotion_code=f"OFF{n}"))
    return f"OFF{n}"


PROMOTION_CASES = [
    Case("PromotionService/CreatePromotion", "admin", _create_promotion, (
        v("the code of an existing promotion (unique conflict of the INSERT)",
          "ALREADY_EXISTS", "PROMOTION_EXISTS", _create_promotion_bad(_code_of)),
        v("the 3rd of 3 rewards names an unknown reward type", "NOT_FOUND",
          "REWARD_TYPE_NOT_FOUND", _create_promotion_bad(_third_reward_unknown)),
        v("the 3rd of 3 budget caps has a negative limit", "INVALID_ARGUMENT", "INVALID_DECIMAL",
          _create_promotion_bad(_last_cap_negative)),
        v("the 3rd reward's value is above its reward type's maximum", "INVALID_ARGUMENT",
          "INVALID_VALUE", _create_promotion_bad(_value_above_type_maximum)),
        v("the 3rd reward's formula does not compile", "INVALID_ARGUMENT", "FORMULA_SYNTAX",
          _create_promotion_bad(_formula_broken)),
    )),
    Case("PromotionService/UpdatePromotion", "admin", _update_promotion, (
        v("an ACTIVE promotion (VIP25, with grants and charged caps)", "FAILED_PRECONDITION",
          "PROMOTION_NOT_EDITABLE", _update_promotion_bad(
              ppb.Promotion(promotion_code="VIP25", name="Renamed"), "name")),
        v("an unknown promotion", "NOT_FOUND", "PROMOTION_NOT_FOUND", _update_promotion_bad(
            ppb.Promotion(promotion_code="NOPE", name="Renamed"), "name")),
        v("fallback_code equal to a code of the pool (found reading the pool)",
          "INVALID_ARGUMENT", "INVALID_FALLBACK_CODE", _fallback_in_pool),
        v("the 2nd of 2 rewards' formula does not compile", "INVALID_ARGUMENT",
          "FORMULA_SYNTAX", _update_promotion_bad(ppb.Promotion(
              promotion_code="DRAFTP", rewards=[
                  ppb.PromotionReward(reward_type="cashback", kind=ppb.REWARD_KIND_SINGLE,
                                      value="15"),
                  ppb.PromotionReward(reward_type="spins", kind=ppb.REWARD_KIND_CALCULATED,
                                      formula="sum(deposit.amount) *")]), "rewards")),
        v("the mask names promotion_code", "INVALID_ARGUMENT", "INVALID_UPDATE_MASK",
          _update_promotion_bad(ppb.Promotion(promotion_code="DRAFTP"), "promotion_code")),
    )),
    Case("PromotionService/ActivatePromotion", "admin", _activate, (
        v("an ACTIVE promotion (VIP25)", "FAILED_PRECONDITION", "INVALID_STATUS_TRANSITION",
          _transition_bad(_activate, ppb.ActivatePromotionRequest, "VIP25")),
        v("an unknown promotion", "NOT_FOUND", "PROMOTION_NOT_FOUND",
          _transition_bad(_activate, ppb.ActivatePromotionRequest, "NOPE")),
        v("a DRAFT whose reward type's maximum was lowered since (checked after the lock)",
          "INVALID_ARGUMENT", "INVALID_VALUE", _transition_bad(
              _activate, ppb.ActivatePromotionRequest, "", _lowered_type_maximum)),
    )),
    Case("PromotionService/DeactivatePromotion", "admin", _deactivate, (
        v("a DRAFT promotion", "FAILED_PRECONDITION", "INVALID_STATUS_TRANSITION",
          _transition_bad(_deactivate, ppb.DeactivatePromotionRequest, "DRAFTP")),
        v("a DEACTIVATED promotion", "FAILED_PRECONDITION", "INVALID_STATUS_TRANSITION",
          _transition_bad(_deactivate, ppb.DeactivatePromotionRequest, "", _deactivated)),
        v("an unknown promotion", "NOT_FOUND", "PROMOTION_NOT_FOUND",
          _transition_bad(_deactivate, ppb.DeactivatePromotionRequest, "NOPE")),
    )),
]


# --- RewardService -----------------------------------------------------------------------------

async def _get_reward(w: World, n: int) -> Request:
    return rpb.GetRewardRequest(promotion_code="VIP25", customer_id=f"g{n}",
                                external_values={"credit": "5"})


def _get_reward_bad(**kw: Any) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        fields: dict[str, Any] = {"promotion_code": "VIP25", "customer_id": f"g{n}",
                                  "external_values": {"credit": "5"}, **kw}
        return rpb.GetRewardRequest(**fields), await _get_reward(w, n)
    return make


def _grant_then_reuse(code: str, first: dict[str, Any], second: dict[str, Any]) -> Prepare:
    """A grant made with a request id, then that id with another customer or external value:
    promo_grant runs (finds the grant: EXISTING) before the request is refused."""
    async def prepare(w: World, n: int, request_id: str) -> Pair:
        made = rpb.GetRewardRequest(request_id=request_id, promotion_code=code,
                                    customer_id=f"h{n}", **first)
        await w.ok("RewardService/GetReward", made, "runtime")
        return rpb.GetRewardRequest(request_id=request_id, promotion_code=code,
                                    **{"customer_id": f"h{n}", **second}), made
    return prepare


async def _revoke(w: World, n: int) -> Request:
    grant = await fz.get_reward(w, "VIP25", f"rv{n}")
    return rpb.RevokeGrantRequest(grant_id=grant.grant.grant_id, reason=f"credit failed {n}")


def _revoke_bad(grant_id: str, reason: str = "x") -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return rpb.RevokeGrantRequest(grant_id=grant_id, reason=reason), await _revoke(w, n)
    return make


REWARD_CASES = [
    Case("RewardService/GetReward", "runtime", _get_reward, (
        v("the 2nd of 2 external values names a reward type that is not EXTERNAL",
          "INVALID_ARGUMENT", "INVALID_EXTERNAL_VALUE",
          _get_reward_bad(external_values={"credit": "5", "cashback": "3"})),
        v("an external value '1_000'", "INVALID_ARGUMENT", "INVALID_DECIMAL",
          _get_reward_bad(external_values={"credit": "1_000"})),
        v("an unknown promotion", "NOT_FOUND", "PROMOTION_NOT_FOUND",
          _get_reward_bad(promotion_code="NOPE")),
        v("a campaign_id of 129 characters", "INVALID_ARGUMENT", "INVALID_ID",
          _get_reward_bad(campaign_id="c" * 129)),
        Variant("the request id of a grant, same customer, another external value "
                "(refused after promo_grant ran)", _grant_then_reuse(
                    "VIP25", {"external_values": {"credit": "5"}},
                    {"external_values": {"credit": "6"}}),
                "INVALID_ARGUMENT", "REQUEST_ID_REUSED"),
        Variant("the request id of a personalized-code grant (FLASH), another customer",
                _grant_then_reuse("FLASH", {}, {"customer_id": "someone-else"}),
                "INVALID_ARGUMENT", "REQUEST_ID_REUSED"),
    )),
    Case("RewardService/RevokeGrant", "runtime", _revoke, (
        v("an unknown grant id (promo_revoke runs)", "NOT_FOUND", "GRANT_NOT_FOUND",
          _revoke_bad("999999999")),
        v("grant_id 'abc'", "INVALID_ARGUMENT", "INVALID_ID", _revoke_bad("abc")),
        v("a reason of 1001 characters", "INVALID_ARGUMENT", "INVALID_REASON",
          _revoke_bad("1", "r" * 1001)),
    )),
]


# --- CodePoolService ---------------------------------------------------------------------------

def _upload(code: str, data: bytes) -> list[Message]:
    return [codepb.UploadCodesRequest(promotion_code=code, data=data[:20]),
            codepb.UploadCodesRequest(data=data[20:])]


async def _upload_valid(w: World, n: int) -> Request:
    return _upload("FLASH", codes_file(f"U{n}", 4) + codes_file(f"U{n}", 1, start=5))


def _upload_bad(data: Callable[[int], bytes], code: str = "FLASH"
                ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return _upload(code, data(n)), await _upload_valid(w, n)
    return make


CODE_CASES = [
    Case("CodePoolService/UploadCodes", "admin", _upload_valid, (
        v("the 5th of 6 codes is already in the pool (found by the COPY, after the upload "
          "row and the pool's sync were written)", "INVALID_ARGUMENT", "CODE_FILE_REJECTED",
          _upload_bad(lambda n: codes_file(f"U{n}", 4) + b"FLASH-000003\n"
                      + codes_file(f"U{n}", 1, start=5))),
        v("the last line is the promotion's fallback code", "INVALID_ARGUMENT",
          "CODE_FILE_REJECTED", _upload_bad(lambda n: codes_file(f"U{n}", 5) + b"FALLBACK-1\n")),
        v("a code on lines 2 and 5", "INVALID_ARGUMENT", "CODE_FILE_REJECTED",
          _upload_bad(lambda n: codes_file(f"U{n}", 4) + codes_file(f"U{n}", 1, start=2))),
        v("a code with a space in the 2nd message", "INVALID_ARGUMENT", "CODE_FILE_REJECTED",
          _upload_bad(lambda n: codes_file(f"U{n}", 4) + b"BAD CODE\n")),
        v("a promotion that is not PERSONALIZED (VIP25)", "FAILED_PRECONDITION",
          "NOT_PERSONALIZED", _upload_bad(lambda n: codes_file(f"U{n}", 4), "VIP25")),
        v("an unknown promotion", "NOT_FOUND", "PROMOTION_NOT_FOUND",
          _upload_bad(lambda n: codes_file(f"U{n}", 4), "NOPE")),
    )),
]


# --- CustomerService ---------------------------------------------------------------------------

def _customers(n: int, edit: Callable[[list[custpb.Customer]], object] | None = None
               ) -> custpb.UpsertCustomersRequest:
    rows = [custpb.Customer(customer_id="c1", currency="EUR", time_zone="Europe/Berlin",
                            properties={"tier": custpb.PropertyValue(string_value="Gold"),
                                        "level": custpb.PropertyValue(decimal_value="3"),
                                        "vip": custpb.PropertyValue(bool_value=True)})]
    rows += [custpb.Customer(customer_id=f"u{n}-{i}", currency="EUR", time_zone="UTC")
             for i in range(1, 5)]
    if edit:
        edit(rows)
    return custpb.UpsertCustomersRequest(customers=rows)


async def _upsert(w: World, n: int) -> Request:
    return _customers(n)


def _upsert_bad(edit: Callable[[list[custpb.Customer]], object]
                ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return _customers(n, edit), _customers(n)
    return make


def _set_field(index: int, **kw: Any) -> Callable[[list[Any]], None]:
    def edit(rows: list[Any]) -> None:
        for name, value in kw.items():
            setattr(rows[index], name, value)
    return edit


def _nul_property(rows: list[custpb.Customer]) -> None:
    rows[1].properties["note"].string_value = "a\x00b"


def _events(n: int, edit: Callable[[list[custpb.Event]], object] | None = None, *,
            create_missing: bool = False, customer: str = "c1") -> custpb.RecordEventsRequest:
    """Five events of known customers: deposits, then bets on slots (rule each-bet counts
    them)."""
    rows = [custpb.Event(external_id=f"x{n}-{i}", customer_id=customer if i < 3 else "c2",
                         kind="deposit" if i < 2 else "bet", amount="10", currency="EUR",
                         attributes={"game": "slots"}) for i in range(5)]
    if edit:
        edit(rows)
    return custpb.RecordEventsRequest(events=rows, create_missing_customers=create_missing)


def _with_times(w: World, request: custpb.RecordEventsRequest) -> custpb.RecordEventsRequest:
    for i, event in enumerate(request.events):
        if not event.HasField("occurred_at"):
            event.occurred_at.CopyFrom(ts(w.clock.now() - timedelta(minutes=30 + i)))
    return request


async def _record(w: World, n: int) -> Request:
    return _with_times(w, _events(n))


def _record_bad(edit: Callable[[list[custpb.Event]], object], *, create_missing: bool = False,
                customer: str = "c1") -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        bad = _with_times(w, _events(n, edit, create_missing=create_missing, customer=customer))
        fixed = _with_times(w, _events(n, create_missing=create_missing, customer=customer))
        return bad, fixed
    return make


def _stored_external_id(rows: list[custpb.Event]) -> None:
    """e0 is stored (c1's deposit of 100 an hour before the world's clock): other content."""
    rows[2].external_id = "e0"
    rows[2].amount = "999"


async def _future_event(w: World, n: int) -> Pair:
    bad = _events(n)
    bad.events[1].occurred_at.CopyFrom(ts(w.clock.now() + timedelta(days=2)))
    return _with_times(w, bad), _with_times(w, _events(n))


CUSTOMER_CASES = [
    Case("CustomerService/UpsertCustomers", "runtime", _upsert, (
        v("the 3rd of 5 customers has currency 'EURO' (the 1st updates c1)",
          "INVALID_ARGUMENT", "INVALID_CUSTOMERS", _upsert_bad(_set_field(2, currency="EURO"))),
        v("the 4th of 5 has time zone Mars/Phobos", "INVALID_ARGUMENT", "INVALID_CUSTOMERS",
          _upsert_bad(_set_field(3, time_zone="Mars/Phobos"))),
        v("the 5th of 5 repeats the 1st", "INVALID_ARGUMENT", "INVALID_CUSTOMERS",
          _upsert_bad(_set_field(4, customer_id="c1"))),
        v("the 2nd of 5 has a property holding NUL", "INVALID_ARGUMENT", "INVALID_CUSTOMERS",
          _upsert_bad(_nul_property)),
    )),
    Case("CustomerService/RecordEvents", "runtime", _record, (
        v("the 3rd of 5 events reuses a stored external id with other content, in a batch "
          "that creates its customer (found after the INSERT)", "INVALID_ARGUMENT",
          "INVALID_EVENTS", _record_bad(_stored_external_id, create_missing=True,
                                        customer="new-customer")),
        v("the 3rd of 5 events names an unknown customer (found by the INSERT)",
          "INVALID_ARGUMENT", "INVALID_EVENTS",
          _record_bad(_set_field(2, customer_id="nobody"))),
        v("the 5th of 5 is a negative deposit", "INVALID_ARGUMENT", "INVALID_EVENTS",
          _record_bad(_set_field(4, kind="deposit", amount="-5"))),
        v("the 2nd of 5 occurs two days after now", "INVALID_ARGUMENT", "INVALID_EVENTS",
          _future_event),
        v("the 4th of 5 repeats the 1st's external id", "INVALID_ARGUMENT", "INVALID_EVENTS",
          _record_bad(lambda rows: setattr(rows[3], "external_id", rows[0].external_id))),
    )),
]


# --- CampaignService / ClearanceService ----------------------------------------------------------

async def _create_campaign(w: World, n: int) -> Request:
    request = fz.campaign_request(f"cn{n}", w)
    request.ClearField("request_id")
    return request


def _campaign_bad(edit: Callable[[campb.CreateCampaignRequest, World], object]
                  ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        bad = await _create_campaign(w, n)
        assert isinstance(bad, campb.CreateCampaignRequest)
        edit(bad, w)
        return bad, await _create_campaign(w, n)
    return make


def _codes(*codes: str) -> Callable[[campb.CreateCampaignRequest, World], None]:
    def edit(request: campb.CreateCampaignRequest, w: World) -> None:
        del request.campaign.promotion_codes[:]
        request.campaign.promotion_codes.extend(codes)
    return edit


def _targets(*ids: str) -> Callable[[campb.CreateCampaignRequest, World], None]:
    def edit(request: campb.CreateCampaignRequest, w: World) -> None:
        del request.customer_ids[:]
        request.customer_ids.extend(ids)
    return edit


def _campaign_id(value: str) -> Callable[[campb.CreateCampaignRequest, World], None]:
    def edit(request: campb.CreateCampaignRequest, w: World) -> None:
        request.campaign.campaign_id = value
    return edit


def _in_the_past(request: campb.CreateCampaignRequest, w: World) -> None:
    request.campaign.execute_at.CopyFrom(ts(w.clock.now() - timedelta(minutes=1)))


async def _cancelled_campaign(w: World, n: int) -> str:
    await ok(w, "CampaignService/CreateCampaign", fz.campaign_request(f"cx{n}", w))
    await ok(w, "CampaignService/CancelCampaign", campb.CancelCampaignRequest(
        campaign_id=f"cx{n}"))
    return f"cx{n}"


async def _add_targets(w: World, n: int) -> Request:
    return campb.AddCampaignTargetsRequest(campaign_id="camp-1",
                                           customer_ids=[f"t{n}-a", f"t{n}-b", "c3"])


def _add_targets_bad(campaign: str | Callable[[World, int], Awaitable[str]],
                     ids: list[str] | None = None) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        target = campaign if isinstance(campaign, str) else await campaign(w, n)
        return (campb.AddCampaignTargetsRequest(
                    campaign_id=target, customer_ids=ids or [f"t{n}-a", f"t{n}-b", "c3"]),
                await _add_targets(w, n))
    return make


async def _cancel(w: World, n: int) -> Request:
    await ok(w, "CampaignService/CreateCampaign", fz.campaign_request(f"cc{n}", w))
    return campb.CancelCampaignRequest(campaign_id=f"cc{n}")


def _cancel_bad(campaign: str | Callable[[World, int], Awaitable[str]]
                ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        target = campaign if isinstance(campaign, str) else await campaign(w, n)
        return campb.CancelCampaignRequest(campaign_id=target), await _cancel(w, n)
    return make


def _statuses(campaign: str, n: int, *pairs: tuple[str, bool]
              ) -> campb.UpdateCustomerPromotionStatusRequest:
    rows = pairs or (("c1", True), ("c2", n % 2 == 0), (f"x{n}", True))
    return campb.UpdateCustomerPromotionStatusRequest(campaign_id=campaign, statuses=[
        campb.CustomerPromotionStatus(customer_id=c, approved=a) for c, a in rows])


async def _clearance(w: World, n: int) -> Request:
    return _statuses("camp-1", n)


def _clearance_bad(campaign: str | Callable[[World, int], Awaitable[str]],
                   *pairs: tuple[str, bool], fixable: bool = True
                   ) -> Callable[[World, int], Awaitable[Pair]]:
    """``fixable``: request ids are scoped to the campaign, so only a refusal of camp-1 has a
    fixed payload under the same scope."""
    async def make(w: World, n: int) -> Pair:
        target = campaign if isinstance(campaign, str) else await campaign(w, n)
        return (_statuses(target, n, *pairs),
                _statuses(target, n) if fixable else None)
    return make


async def _clearance_closed(w: World, n: int) -> str:
    """A campaign whose execute_at has just passed (its execution job has not run yet)."""
    request = fz.campaign_request(f"cl{n}", w)
    request.campaign.execute_at.CopyFrom(ts(w.clock.now() + timedelta(seconds=10)))
    await ok(w, "CampaignService/CreateCampaign", request)
    w.clock.advance(timedelta(seconds=20))
    return f"cl{n}"


CAMPAIGN_CASES = [
    Case("CampaignService/CreateCampaign", "admin", _create_campaign, (
        v("the 2nd of 2 promotions is a DRAFT", "FAILED_PRECONDITION", "PROMOTION_NOT_ACTIVE",
          _campaign_bad(_codes("VIP25", "DRAFTP"))),
        v("the last of 3 promotion codes is unknown", "NOT_FOUND", "PROMOTION_NOT_FOUND",
          _campaign_bad(_codes("VIP25", "CALC", "NOPE"))),
        v("the campaign_id of an existing campaign, with targets (unique conflict)",
          "ALREADY_EXISTS", "CAMPAIGN_EXISTS", _campaign_bad(_campaign_id("camp-1"))),
        v("the 3rd of 5 customer ids is empty", "INVALID_ARGUMENT", "INVALID_CUSTOMER_ID",
          _campaign_bad(_targets("c1", "c2", "", "c3", "z1"))),
        v("execute_at a minute ago (checked in the transaction)", "INVALID_ARGUMENT",
          "EXECUTION_IN_PAST",
          _campaign_bad(_in_the_past)),
    )),
    Case("CampaignService/AddCampaignTargets", "admin", _add_targets, (
        v("a CANCELLED campaign", "FAILED_PRECONDITION", "CAMPAIGN_NOT_SCHEDULED",
          _add_targets_bad(_cancelled_campaign)),
        v("an unknown campaign", "NOT_FOUND", "CAMPAIGN_NOT_FOUND", _add_targets_bad("nope")),
        v("the 3rd of 5 customer ids is 129 characters", "INVALID_ARGUMENT",
          "INVALID_CUSTOMER_ID", _add_targets_bad("camp-1", ["t-a", "t-b", "t" * 129, "c3",
                                                               "z1"])),
    )),
    Case("CampaignService/CancelCampaign", "admin", _cancel, (
        v("a CANCELLED campaign", "FAILED_PRECONDITION", "CAMPAIGN_NOT_OPEN",
          _cancel_bad(_cancelled_campaign)),
        v("an unknown campaign", "NOT_FOUND", "CAMPAIGN_NOT_FOUND", _cancel_bad("nope")),
    )),
    Case("ClearanceService/UpdateCustomerPromotionStatus", "listener", _clearance, (
        v("the 3rd of 5 statuses has an empty customer id (1st and 2nd are targets)",
          "INVALID_ARGUMENT", "INVALID_CUSTOMER_ID", _clearance_bad(
              "camp-1", ("c1", True), ("c2", True), ("", True), ("c3", True), ("z1", False))),
        v("the 4th of 4 statuses has a customer id of 129 characters", "INVALID_ARGUMENT",
          "INVALID_CUSTOMER_ID", _clearance_bad(
              "camp-1", ("c1", False), ("c2", True), ("z1", True), ("c" * 129, True))),
        v("a CANCELLED campaign", "FAILED_PRECONDITION", "CLEARANCE_CLOSED",
          _clearance_bad(_cancelled_campaign, ("c1", True), fixable=False)),
        v("a campaign whose execute_at has passed", "FAILED_PRECONDITION", "CLEARANCE_CLOSED",
          _clearance_bad(_clearance_closed, ("c1", True), fixable=False)),
        v("an unknown campaign", "NOT_FOUND", "CAMPAIGN_NOT_FOUND",
          _clearance_bad("nope", ("c1", True), fixable=False)),
    )),
]


# --- ListenerService ---------------------------------------------------------------------------

async def _register(w: World, n: int) -> Request:
    return lpb.RegisterListenerRequest(listener=lpb.Listener(
        event_type=lpb.EVENT_TYPE_BONUS_CALCULATED, url=f"https://hooks.example.com/r{n}"))


def _register_bad(listener: lpb.Listener) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return lpb.RegisterListenerRequest(listener=listener), await _register(w, n)
    return make


async def _update_listener(w: World, n: int) -> Request:
    return lpb.UpdateListenerRequest(listener=lpb.Listener(
        listener_id=w.facts["listener"], description=f"ops {n}"),
        update_mask=mask("description"))


def _update_listener_bad(listener: Callable[[World], lpb.Listener], *paths: str
                         ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return (lpb.UpdateListenerRequest(listener=listener(w), update_mask=mask(*paths)),
                await _update_listener(w, n))
    return make


async def _new_listener(w: World, n: int, event_type: int = lpb.EVENT_TYPE_BONUS_SKIPPED) -> int:
    created = await ok(w, "ListenerService/RegisterListener", lpb.RegisterListenerRequest(
        listener=lpb.Listener(event_type=event_type, url=f"https://hooks.example.com/u{n}")))
    return int(created.listener.listener_id)


async def _unregister(w: World, n: int) -> Request:
    return lpb.UnregisterListenerRequest(listener_id=await _new_listener(w, n))


async def _unregistered(w: World, n: int) -> Pair:
    listener_id = await _new_listener(w, n)
    await ok(w, "ListenerService/UnregisterListener",
             lpb.UnregisterListenerRequest(listener_id=listener_id))
    return lpb.UnregisterListenerRequest(listener_id=listener_id), await _unregister(w, n)


async def _unknown_listener(w: World, n: int) -> Pair:
    return lpb.UnregisterListenerRequest(listener_id=999999), await _unregister(w, n)


async def _redeliver(w: World, n: int) -> Request:
    return lpb.RedeliverEventRequest(delivery_id=await fz.failed_delivery(w))


async def _pending_delivery(w: World, n: int) -> Pair:
    async with w.pool.acquire() as conn, conn.transaction():
        await webhooks_repo.emit_event(conn, event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN,
                                       now=w.clock.now(), payload={"campaign_id": f"p{n}"})
        pending = await conn.fetchval("SELECT max(id) FROM webhook_deliveries")
    return lpb.RedeliverEventRequest(delivery_id=pending), await _redeliver(w, n)


async def _inactive_listener_delivery(w: World, n: int) -> Pair:
    listener_id = await _new_listener(w, n, lpb.EVENT_TYPE_BONUS_SKIPPED)
    async with w.pool.acquire() as conn, conn.transaction():
        await webhooks_repo.emit_event(conn, event_type=lpb.EVENT_TYPE_BONUS_SKIPPED,
                                       now=w.clock.now(), payload={"bonus_id": f"b{n}"})
        delivery = await conn.fetchval(
            "SELECT max(id) FROM webhook_deliveries WHERE listener_id = $1", listener_id)
        await conn.execute("UPDATE webhook_deliveries SET status = 'FAILED', attempts = 1, "
                           "last_error = 'HTTP 500' WHERE listener_id = $1", listener_id)
        await conn.execute("UPDATE outbox_jobs SET status = 'done' WHERE status = 'pending' "
                           "AND kind LIKE 'webhook%'")
    await ok(w, "ListenerService/UpdateListener", lpb.UpdateListenerRequest(
        listener=lpb.Listener(listener_id=listener_id, active=False), update_mask=mask("active")))
    return lpb.RedeliverEventRequest(delivery_id=delivery), await _redeliver(w, n)


async def _unknown_delivery(w: World, n: int) -> Pair:
    return lpb.RedeliverEventRequest(delivery_id=99999999), await _redeliver(w, n)


LISTENER_CASES = [
    Case("ListenerService/RegisterListener", "admin", _register, (
        v("url javascript:alert(1)", "INVALID_ARGUMENT", "INVALID_URL", _register_bad(
            lpb.Listener(event_type=lpb.EVENT_TYPE_BONUS_CALCULATED, url="javascript:alert(1)"))),
        v("an e-mail listener with a url", "INVALID_ARGUMENT", "INVALID_URL", _register_bad(
            lpb.Listener(event_type=lpb.EVENT_TYPE_CAMPAIGN_EXECUTED,
                         channel=lpb.LISTENER_CHANNEL_EMAIL, url="https://hooks.example.com/e",
                         email_recipients=["ops@example.com"]))),
        v("the 2nd of 2 e-mail recipients is 'a@b@c'", "INVALID_ARGUMENT", "INVALID_EMAIL",
          _register_bad(lpb.Listener(event_type=lpb.EVENT_TYPE_CAMPAIGN_EXECUTED,
                                     channel=lpb.LISTENER_CHANNEL_EMAIL,
                                     email_recipients=["ops@example.com", "a@b@c"]))),
        v("event type 999", "INVALID_ARGUMENT", "INVALID_EVENT_TYPE", _register_bad(
            lpb.Listener(event_type=999, url="https://hooks.example.com/x"))),
    )),
    Case("ListenerService/UpdateListener", "admin", _update_listener, (
        v("a url for the e-mail listener (wrong channel, read from the database)",
          "FAILED_PRECONDITION", "WRONG_CHANNEL", _update_listener_bad(
              lambda w: lpb.Listener(listener_id=w.facts["email_listener"],
                                     url="https://hooks.example.com/z"), "url")),
        v("an unknown listener", "NOT_FOUND", "LISTENER_NOT_FOUND", _update_listener_bad(
            lambda w: lpb.Listener(listener_id=999999, description="x"), "description")),
        v("the mask names event_type", "INVALID_ARGUMENT", "INVALID_UPDATE_MASK",
          _update_listener_bad(lambda w: lpb.Listener(
              listener_id=w.facts["listener"], event_type=lpb.EVENT_TYPE_BONUS_SKIPPED),
              "event_type")),
        v("url ftp://", "INVALID_ARGUMENT", "INVALID_URL", _update_listener_bad(
            lambda w: lpb.Listener(listener_id=w.facts["listener"], url="ftp://x.example.com/"),
            "url", "description")),
    )),
    Case("ListenerService/UnregisterListener", "admin", _unregister, (
        v("an unknown listener", "NOT_FOUND", "LISTENER_NOT_FOUND", _unknown_listener),
        v("a listener already unregistered", "NOT_FOUND", "LISTENER_NOT_FOUND", _unregistered),
    )),
    Case("ListenerService/RedeliverEvent", "admin", _redeliver, (
        v("an unknown delivery", "NOT_FOUND", "DELIVERY_NOT_FOUND", _unknown_delivery),
        v("a PENDING delivery", "FAILED_PRECONDITION", "DELIVERY_PENDING", _pending_delivery),
        v("a FAILED delivery of an inactive listener", "FAILED_PRECONDITION",
          "LISTENER_INACTIVE", _inactive_listener_delivery),
    )),
]


# --- ProductPromotionService -------------------------------------------------------------------

async def _create_pp(w: World, n: int) -> Request:
    request = fz.personalized_request(f"pp{n}")
    request.ClearField("request_id")
    return request


def _create_pp_bad(**kw: Any) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        bad = await _create_pp(w, n)
        assert isinstance(bad, prodpb.CreatePersonalizedPromotionRequest)
        for name, value in kw.items():
            setattr(bad.personalized_promotion, name, value)
        return bad, await _create_pp(w, n)
    return make


async def _update_pp(w: World, n: int) -> Request:
    return prodpb.UpdatePersonalizedPromotionRequest(
        personalized_promotion=prodpb.PersonalizedPromotion(backend_id="coffee",
                                                            name=f"Our coffee {n}"),
        update_mask=mask("name"))


async def _below_choices(w: World, n: int) -> Pair:
    await ok(w, "ProductPromotionService/SelectProducts", prodpb.SelectProductsRequest(
        customer_id="c1", personalized_promotion_id="coffee",
        product_ids=["espresso", "latte"]), "runtime")
    return (prodpb.UpdatePersonalizedPromotionRequest(
                personalized_promotion=prodpb.PersonalizedPromotion(
                    backend_id="coffee", max_distinct_products=1),
                update_mask=mask("max_distinct_products")),
            prodpb.UpdatePersonalizedPromotionRequest(
                personalized_promotion=prodpb.PersonalizedPromotion(
                    backend_id="coffee", max_distinct_products=2),
                update_mask=mask("max_distinct_products")))


def _update_pp_bad(backend_id: str, *paths: str, **kw: Any
                   ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return (prodpb.UpdatePersonalizedPromotionRequest(
                    personalized_promotion=prodpb.PersonalizedPromotion(backend_id=backend_id,
                                                                        **kw),
                    update_mask=mask(*paths)), await _update_pp(w, n))
    return make


async def _delete_pp(w: World, n: int) -> Request:
    await ok(w, "ProductPromotionService/CreatePersonalizedPromotion",
             fz.personalized_request(f"del{n}"))
    return prodpb.DeletePersonalizedPromotionRequest(backend_id=f"del{n}")


def _delete_pp_bad(backend_id: str) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return (prodpb.DeletePersonalizedPromotionRequest(backend_id=backend_id),
                await _delete_pp(w, n))
    return make


async def _assign(w: World, n: int) -> Request:
    return prodpb.AssignProductListsRequest(
        personalized_promotion_id="coffee", customer_ids=["c3", f"m{n % 250}"],
        product_ids=["espresso", "latte", "mocha"], default_product_id="mocha")


def _assign_bad(**kw: Any) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        fields: dict[str, Any] = {
            "personalized_promotion_id": "coffee", "customer_ids": ["c1", "c2", "c3"],
            "product_ids": ["espresso", "latte", "mocha"], "default_product_id": "mocha", **kw}
        return prodpb.AssignProductListsRequest(**fields), await _assign(w, n)
    return make


async def _remove(w: World, n: int) -> Request:
    customer = f"m{n % 250}"
    await ok(w, "ProductPromotionService/AssignProductLists", prodpb.AssignProductListsRequest(
        personalized_promotion_id="coffee", customer_ids=[customer],
        product_ids=["espresso", "latte"]))
    return prodpb.RemoveProductListsRequest(personalized_promotion_id="coffee",
                                            customer_ids=[customer])


def _remove_bad(promotion: str, customers: list[str]) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        fixed = await _remove(w, n)
        return prodpb.RemoveProductListsRequest(personalized_promotion_id=promotion,
                                                customer_ids=customers), fixed
    return make


async def _create_discount(w: World, n: int) -> Request:
    request = fz.discount_request(f"disc{n}")
    request.ClearField("request_id")
    return request


def _discount_bad(edit: Callable[[prodpb.ProductSetDiscount], object]
                  ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        bad = await _create_discount(w, n)
        assert isinstance(bad, prodpb.CreateProductSetDiscountRequest)
        edit(bad.product_set_discount)
        return bad, await _create_discount(w, n)
    return make


def _unknown_link(discount: prodpb.ProductSetDiscount) -> None:
    discount.product_sets[1].personalized_promotion_id = "no-such-promotion"


async def _update_discount(w: World, n: int) -> Request:
    return prodpb.UpdateProductSetDiscountRequest(
        product_set_discount=prodpb.ProductSetDiscount(discount_id="breakfast",
                                                       name=f"Deal {n}"),
        update_mask=mask("name"))


def _update_discount_bad(discount: prodpb.ProductSetDiscount, *paths: str
                         ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return (prodpb.UpdateProductSetDiscountRequest(product_set_discount=discount,
                                                       update_mask=mask(*paths)),
                await _update_discount(w, n))
    return make


async def _delete_discount(w: World, n: int) -> Request:
    await ok(w, "ProductPromotionService/CreateProductSetDiscount", fz.discount_request(f"dd{n}"))
    return prodpb.DeleteProductSetDiscountRequest(discount_id=f"dd{n}")


async def _unknown_discount(w: World, n: int) -> Pair:
    return (prodpb.DeleteProductSetDiscountRequest(discount_id="nope"),
            await _delete_discount(w, n))


async def _select(w: World, n: int) -> Request:
    return prodpb.SelectProductsRequest(
        customer_id="c1", personalized_promotion_id="coffee",
        product_ids=["espresso"] if n % 2 else ["latte", "espresso"])


def _select_bad(customer: str, products: list[str], promotion: str = "coffee"
                ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return (prodpb.SelectProductsRequest(customer_id=customer,
                                             personalized_promotion_id=promotion,
                                             product_ids=products), await _select(w, n))
    return make


def _basket(customer: str, n: int, *lines: tuple[str, int, str]) -> prodpb.ApplyBasketRequest:
    rows = lines or (("bread", 1 + n % 2, "2.50"), ("butter", 1, "3.20"), ("latte", 2, "7.99"))
    return prodpb.ApplyBasketRequest(customer_id=customer, lines=[
        prodpb.BasketLine(product_id=p, quantity=q, unit_price=price) for p, q, price in rows])


async def _apply(w: World, n: int) -> Request:
    return _basket("c2", n)


def _apply_bad(customer: str, *lines: tuple[str, int, str]
               ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return _basket(customer, n, *lines), _basket("c2", n)
    return make


PRODUCT_CASES = [
    Case("ProductPromotionService/CreatePersonalizedPromotion", "admin", _create_pp, (
        v("the backend_id of an existing one (unique conflict of the INSERT)", "ALREADY_EXISTS",
          "PERSONALIZED_PROMOTION_EXISTS", _create_pp_bad(backend_id="coffee")),
        v("max_distinct_products -1", "INVALID_ARGUMENT", "INVALID_MAX_DISTINCT_PRODUCTS",
          _create_pp_bad(max_distinct_products=-1)),
    )),
    Case("ProductPromotionService/UpdatePersonalizedPromotion", "admin", _update_pp, (
        v("max_distinct_products below a customer's choice (counted in the database)",
          "FAILED_PRECONDITION", "SELECTIONS_EXCEED_MAXIMUM", _below_choices),
        v("an unknown personalized promotion", "NOT_FOUND", "PERSONALIZED_PROMOTION_NOT_FOUND",
          _update_pp_bad("nope", "name", name="x")),
        v("the mask names a field that does not exist", "INVALID_ARGUMENT",
          "INVALID_UPDATE_MASK", _update_pp_bad("coffee", "name", "colour", name="x")),
    )),
    Case("ProductPromotionService/DeletePersonalizedPromotion", "admin", _delete_pp, (
        v("one a product-set discount uses (coffee, with customers' lists)",
          "FAILED_PRECONDITION", "PERSONALIZED_PROMOTION_IN_USE", _delete_pp_bad("coffee")),
        v("an unknown personalized promotion", "NOT_FOUND", "PERSONALIZED_PROMOTION_NOT_FOUND",
          _delete_pp_bad("nope")),
    )),
    Case("ProductPromotionService/AssignProductLists", "admin", _assign, (
        v("the 3rd of 5 customers is unknown (the 1st and 2nd have lists to replace)",
          "NOT_FOUND", "CUSTOMER_NOT_FOUND",
          _assign_bad(customer_ids=["c1", "c2", "nobody", "c3", "z1"])),
        v("the 4th of 4 customers repeats the 1st", "INVALID_ARGUMENT", "DUPLICATE_CUSTOMER",
          _assign_bad(customer_ids=["c1", "c2", "c3", "c1"])),
        v("the default product is not on the list", "INVALID_ARGUMENT",
          "DEFAULT_PRODUCT_NOT_ON_LIST", _assign_bad(default_product_id="tea")),
        v("an unknown personalized promotion", "NOT_FOUND",
          "PERSONALIZED_PROMOTION_NOT_FOUND", _assign_bad(personalized_promotion_id="nope")),
    )),
    Case("ProductPromotionService/RemoveProductLists", "admin", _remove, (
        v("an unknown personalized promotion", "NOT_FOUND",
          "PERSONALIZED_PROMOTION_NOT_FOUND", _remove_bad("nope", ["c1"])),
        v("the 3rd of 3 customers repeats the 1st (c1, c2 have lists)", "INVALID_ARGUMENT",
          "DUPLICATE_CUSTOMER", _remove_bad("coffee", ["c1", "c2", "c1"])),
    )),
    Case("ProductPromotionService/CreateProductSetDiscount", "admin", _create_discount, (
        v("the discount_id of an existing discount (unique conflict of the INSERT)",
          "ALREADY_EXISTS", "PRODUCT_SET_DISCOUNT_EXISTS",
          _discount_bad(lambda d: setattr(d, "discount_id", "breakfast"))),
        v("the 2nd of 2 product sets links an unknown personalized promotion", "NOT_FOUND",
          "PERSONALIZED_PROMOTION_NOT_FOUND", _discount_bad(_unknown_link)),
        v("a percentage of 150", "INVALID_ARGUMENT", "INVALID_VALUE",
          _discount_bad(lambda d: setattr(d, "value", "150"))),
    )),
    Case("ProductPromotionService/UpdateProductSetDiscount", "admin", _update_discount, (
        v("an unknown discount", "NOT_FOUND", "PRODUCT_SET_DISCOUNT_NOT_FOUND",
          _update_discount_bad(prodpb.ProductSetDiscount(discount_id="nope", name="x"),
                               "name")),
        v("new product sets, the 2nd linking an unknown personalized promotion", "NOT_FOUND",
          "PERSONALIZED_PROMOTION_NOT_FOUND", _update_discount_bad(prodpb.ProductSetDiscount(
              discount_id="breakfast", product_sets=[
                  prodpb.ProductSet(name="Basics", product_ids=["bread"], required_quantity=1),
                  prodpb.ProductSet(name="Yours", personalized_promotion_id="no-such",
                                    required_quantity=1, gets_discount=True,
                                    discounted_quantity=1)]), "product_sets")),
        v("a percentage of 150", "INVALID_ARGUMENT", "INVALID_VALUE",
          _update_discount_bad(prodpb.ProductSetDiscount(discount_id="breakfast", value="150"),
                               "value")),
    )),
    Case("ProductPromotionService/DeleteProductSetDiscount", "admin", _delete_discount, (
        v("an unknown discount (the DELETE finds no row)", "NOT_FOUND",
          "PRODUCT_SET_DISCOUNT_NOT_FOUND", _unknown_discount),
    )),
    Case("ProductPromotionService/SelectProducts", "runtime", _select, (
        v("the 2nd of 2 products is not on the customer's list", "INVALID_ARGUMENT",
          "PRODUCT_NOT_ON_LIST", _select_bad("c1", ["latte", "mocha"])),
        v("a product twice", "INVALID_ARGUMENT", "DUPLICATE_PRODUCT",
          _select_bad("c1", ["latte", "espresso", "latte"])),
        v("a customer without a list in this promotion (z1)", "NOT_FOUND",
          "PRODUCT_LIST_NOT_FOUND", _select_bad("z1", ["latte"])),
        v("an unknown customer", "NOT_FOUND", "CUSTOMER_NOT_FOUND",
          _select_bad("nobody", ["latte"])),
    )),
    Case("ProductPromotionService/ApplyBasket", "runtime", _apply, (
        v("the 3rd of 3 lines has a negative price (c1's first apply would be recorded)",
          "INVALID_ARGUMENT", "INVALID_DECIMAL",
          _apply_bad("c1", ("bread", 1, "2.50"), ("butter", 1, "3.20"), ("latte", 2, "-7.99"))),
        v("the 2nd of 3 lines has quantity 0", "INVALID_ARGUMENT", "INVALID_QUANTITY",
          _apply_bad("c1", ("bread", 1, "2.50"), ("butter", 0, "3.20"), ("latte", 2, "7.99"))),
        v("an unknown customer", "NOT_FOUND", "CUSTOMER_NOT_FOUND",
          _apply_bad("nobody", ("bread", 1, "2.50"), ("butter", 1, "3.20"),
                     ("latte", 2, "7.99"))),
    )),
]


# --- BonusService ------------------------------------------------------------------------------

async def _create_definition(w: World, n: int) -> Request:
    request = fz.definition_request(f"def{n}")
    request.ClearField("request_id")
    return request


def _definition_bad(edit: Callable[[bpb.BonusDefinition], object]
                    ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        bad = await _create_definition(w, n)
        assert isinstance(bad, bpb.CreateBonusDefinitionRequest)
        edit(bad.definition)
        return bad, await _create_definition(w, n)
    return make


def _bad_variable(definition: bpb.BonusDefinition) -> None:
    definition.variables[0].per_currency["USD"] = "1_0"


async def _update_definition(w: World, n: int) -> Request:
    return bpb.UpdateBonusDefinitionRequest(definition=bpb.BonusDefinition(
        definition_id="bets-10", display_name=f"Bets {n}"), update_mask=mask("display_name"))


def _update_definition_bad(definition: bpb.BonusDefinition, *paths: str
                           ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return (bpb.UpdateBonusDefinitionRequest(definition=definition,
                                                 update_mask=mask(*paths)),
                await _update_definition(w, n))
    return make


async def _request_calculation(w: World, n: int) -> Request:
    return bpb.RequestBonusCalculationRequest(definition_id="bets-10",
                                              customer_ids=["c1", "c2", f"m{n % 250}"])


def _request_bad(**kw: Any) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        fields: dict[str, Any] = {"definition_id": "bets-10",
                                  "customer_ids": ["c1", "c2", "m1"], **kw}
        return bpb.RequestBonusCalculationRequest(**fields), await _request_calculation(w, n)
    return make


def _next_bonus(w: World) -> str:
    ids: list[str] = w.facts["bonus_ids"]
    assert len(ids) > 1, "the world's approval queue ran out"
    return ids.pop()


async def _approve(w: World, n: int) -> Request:
    return bpb.ApproveBonusResultsRequest(bonus_ids=[_next_bonus(w)])


async def _reject(w: World, n: int) -> Request:
    return bpb.RejectBonusResultsRequest(bonus_ids=[_next_bonus(w)], reason=f"abuse {n}")


def _decide_bad(rpc: str, tail: Callable[[World], Awaitable[str] | str] | None, *,
                reason: str = "abuse") -> Callable[[World, int], Awaitable[Pair]]:
    """[a, b, <tail>] refused, then [a, b] (CALCULATED results of the queue) fixed."""
    async def make(w: World, n: int) -> Pair:
        head = [_next_bonus(w), _next_bonus(w)]
        last = tail(w) if tail else None
        if asyncio.iscoroutine(last):
            last = await last
        kind = bpb.ApproveBonusResultsRequest if rpc == "approve" else bpb.RejectBonusResultsRequest
        extra = {} if rpc == "approve" else {"reason": reason}
        fixed = {} if rpc == "approve" else {"reason": "abuse"}
        ids = [*head, last] if last is not None else head
        return kind(bonus_ids=ids, **extra), kind(bonus_ids=head, **fixed)
    return make


async def _issued(w: World) -> str:
    bonus_id = _next_bonus(w)
    await ok(w, "BonusService/ApproveBonusResults",
             bpb.ApproveBonusResultsRequest(bonus_ids=[bonus_id]))
    return bonus_id


async def _rejected(w: World) -> str:
    bonus_id = _next_bonus(w)
    await ok(w, "BonusService/RejectBonusResults",
             bpb.RejectBonusResultsRequest(bonus_ids=[bonus_id], reason="setup"))
    return bonus_id


async def _recalculate(w: World, n: int) -> Request:
    await ok(w, "BonusService/CreateBonusDefinition", bpb.CreateBonusDefinitionRequest(
        definition=bonus_api.definition(f"rc{n}", "sum(deposit.amount) * 5%",
                                           approval_mode=bpb.APPROVAL_MODE_MANUAL)))
    return bpb.RecalculateBonusResultsRequest(definition_id=f"rc{n}")


def _recalculate_bad(definition_id: str) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return (bpb.RecalculateBonusResultsRequest(definition_id=definition_id),
                await _recalculate(w, n))
    return make


async def _create_rule(w: World, n: int) -> Request:
    request = fz.rule_request(f"rule{n}")
    request.ClearField("request_id")
    return request


def _rule_bad(edit: Callable[[bpb.BonusRule], object]) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        bad = await _create_rule(w, n)
        assert isinstance(bad, bpb.CreateBonusRuleRequest)
        edit(bad.rule)
        return bad, await _create_rule(w, n)
    return make


async def _update_rule(w: World, n: int) -> Request:
    return bpb.UpdateBonusRuleRequest(rule=bpb.BonusRule(rule_id="each-bet", every=2 + n % 2,
                                                         max_executions=3 + n % 2),
                                      update_mask=mask("max_executions"))


def _update_rule_bad(rule: bpb.BonusRule, *paths: str) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return (bpb.UpdateBonusRuleRequest(rule=rule, update_mask=mask(*paths)),
                await _update_rule(w, n))
    return make


async def _create_schedule(w: World, n: int) -> Request:
    request = fz.schedule_request(f"sched{n}")
    request.ClearField("request_id")
    return request


def _schedule_bad(edit: Callable[[bpb.BonusSchedule], object]
                  ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        bad = await _create_schedule(w, n)
        assert isinstance(bad, bpb.CreateBonusScheduleRequest)
        edit(bad.schedule)
        return bad, await _create_schedule(w, n)
    return make


def _schedule_customers(*ids: str) -> Callable[[bpb.BonusSchedule], None]:
    def edit(schedule: bpb.BonusSchedule) -> None:
        del schedule.customer_ids[:]
        schedule.customer_ids.extend(ids)
    return edit


async def _update_schedule(w: World, n: int) -> Request:
    return bpb.UpdateBonusScheduleRequest(schedule=bpb.BonusSchedule(
        schedule_id="daily", local_time=f"0{n % 2 + 7}:30"), update_mask=mask("local_time"))


def _update_schedule_bad(schedule: bpb.BonusSchedule, *paths: str
                         ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        return (bpb.UpdateBonusScheduleRequest(schedule=schedule, update_mask=mask(*paths)),
                await _update_schedule(w, n))
    return make


BONUS_CASES = [
    Case("BonusService/CreateBonusDefinition", "admin", _create_definition, (
        v("the definition_id of an existing definition (unique conflict of the INSERT)",
          "ALREADY_EXISTS", "BONUS_DEFINITION_EXISTS",
          _definition_bad(lambda d: setattr(d, "definition_id", "bets-10"))),
        v("a formula with an error on line 2", "INVALID_ARGUMENT", "FORMULA_SYNTAX",
          _definition_bad(lambda d: setattr(d, "formula", "x = 1\nx +"))),
        v("the 1st variable's USD value is '1_0'", "INVALID_ARGUMENT", "INVALID_VARIABLE",
          _definition_bad(_bad_variable)),
    )),
    Case("BonusService/UpdateBonusDefinition", "admin", _update_definition, (
        v("an unknown definition", "NOT_FOUND", "BONUS_DEFINITION_NOT_FOUND",
          _update_definition_bad(bpb.BonusDefinition(definition_id="nope", display_name="x"),
                                 "display_name")),
        v("a formula reading a variable the STORED definition lacks (found by the merge)",
          "INVALID_ARGUMENT", "FORMULA_INVALID", _update_definition_bad(bpb.BonusDefinition(
              definition_id="bets-10", formula="last(deposit.amount) * nosuchvar"), "formula")),
        v("the mask names a field that does not exist", "INVALID_ARGUMENT",
          "INVALID_UPDATE_MASK", _update_definition_bad(bpb.BonusDefinition(
              definition_id="bets-10", display_name="x"), "display_name", "colour")),
    )),
    Case("BonusService/RequestBonusCalculation", "runtime", _request_calculation, (
        v("the 3rd of 5 customers is unknown (found by the database)", "NOT_FOUND",
          "CUSTOMER_NOT_FOUND", _request_bad(customer_ids=["c1", "c2", "nobody", "m1", "m2"])),
        v("period_start without period_end", "INVALID_ARGUMENT", "INVALID_PERIOD",
          _request_bad(period_start=ts(datetime(2026, 11, 20, tzinfo=UTC)))),
        v("an unknown definition", "NOT_FOUND", "BONUS_DEFINITION_NOT_FOUND",
          _request_bad(definition_id="nope")),
        v("the 4th of 4 customers repeats the 1st", "INVALID_ARGUMENT", "DUPLICATE_ID",
          _request_bad(customer_ids=["c1", "c2", "m1", "c1"])),
    )),
    Case("BonusService/ApproveBonusResults", "admin", _approve, (
        v("the 3rd of 3 results is already ISSUED (found after locking the rows)",
          "FAILED_PRECONDITION", "BONUS_NOT_AWAITING_APPROVAL", _decide_bad("approve", _issued)),
        v("the 3rd of 3 results is REJECTED", "FAILED_PRECONDITION", "BONUS_NOT_AWAITING_APPROVAL",
          _decide_bad("approve", _rejected)),
        v("the 3rd of 3 ids is unknown", "NOT_FOUND", "BONUS_RESULT_NOT_FOUND",
          _decide_bad("approve", lambda w: UNKNOWN_UUID)),
        v("the 3rd of 3 ids is not an id ('xyz')", "INVALID_ARGUMENT", "INVALID_ID",
          _decide_bad("approve", lambda w: "xyz")),
    )),
    Case("BonusService/RejectBonusResults", "admin", _reject, (
        v("the 3rd of 3 results is already ISSUED", "FAILED_PRECONDITION",
          "BONUS_NOT_AWAITING_APPROVAL", _decide_bad("reject", _issued)),
        v("the 3rd of 3 ids is unknown", "NOT_FOUND", "BONUS_RESULT_NOT_FOUND",
          _decide_bad("reject", lambda w: UNKNOWN_UUID)),
        v("a reason of 501 characters", "INVALID_ARGUMENT", "INVALID_REASON",
          _decide_bad("reject", None, reason="r" * 501)),
    )),
    Case("BonusService/RecalculateBonusResults", "admin", _recalculate, (
        v("an unknown definition", "NOT_FOUND", "BONUS_DEFINITION_NOT_FOUND",
          _recalculate_bad("nope")),
        v("no definition_id", "INVALID_ARGUMENT", "MISSING_FIELD", _recalculate_bad("")),
    )),
    Case("BonusService/CreateBonusRule", "admin", _create_rule, (
        v("the rule_id of an existing rule (conflict of the INSERT)", "ALREADY_EXISTS",
          "BONUS_RULE_EXISTS", _rule_bad(lambda r: setattr(r, "rule_id", "each-bet"))),
        v("an unknown definition", "NOT_FOUND", "BONUS_DEFINITION_NOT_FOUND",
          _rule_bad(lambda r: setattr(r, "definition_id", "nope"))),
        v("a filter that does not compile", "INVALID_ARGUMENT", "FORMULA_SYNTAX",
          _rule_bad(lambda r: setattr(r, "filter", 'game == "slots" and'))),
        v("every 0", "INVALID_ARGUMENT", "INVALID_BONUS_RULE",
          _rule_bad(lambda r: setattr(r, "every", 0))),
    )),
    Case("BonusService/UpdateBonusRule", "admin", _update_rule, (
        v("an unknown rule", "NOT_FOUND", "BONUS_RULE_NOT_FOUND", _update_rule_bad(
            bpb.BonusRule(rule_id="nope", every=3), "every")),
        v("a filter that does not compile (after the rule's row is locked)",
          "INVALID_ARGUMENT", "FORMULA_SYNTAX", _update_rule_bad(
              bpb.BonusRule(rule_id="each-bet", filter="game ==", every=9), "every", "filter")),
        v("the mask names a field that does not exist", "INVALID_ARGUMENT",
          "INVALID_UPDATE_MASK", _update_rule_bad(bpb.BonusRule(rule_id="each-bet", every=3),
                                                  "every", "colour")),
    )),
    Case("BonusService/CreateBonusSchedule", "admin", _create_schedule, (
        v("the schedule_id of an existing schedule (conflict of the INSERT)", "ALREADY_EXISTS",
          "BONUS_SCHEDULE_EXISTS", _schedule_bad(lambda s: setattr(s, "schedule_id", "daily"))),
        v("the 3rd of 4 customers is unknown (found by the database)", "NOT_FOUND",
          "CUSTOMER_NOT_FOUND", _schedule_bad(_schedule_customers("z1", "c1", "nobody", "c2"))),
        v("local_time 25:61", "INVALID_ARGUMENT", "INVALID_TIME",
          _schedule_bad(lambda s: setattr(s, "local_time", "25:61"))),
        v("an unknown definition", "NOT_FOUND", "BONUS_DEFINITION_NOT_FOUND",
          _schedule_bad(lambda s: setattr(s, "definition_id", "nope"))),
    )),
    Case("BonusService/UpdateBonusSchedule", "admin", _update_schedule, (
        v("new customers, the 2nd of 3 unknown (checked against the stored schedule)",
          "NOT_FOUND", "CUSTOMER_NOT_FOUND", _update_schedule_bad(bpb.BonusSchedule(
              schedule_id="daily", customer_ids=["z1", "nobody", "c2"], local_time="09:00"),
              "customer_ids", "local_time")),
        v("an unknown schedule", "NOT_FOUND", "BONUS_SCHEDULE_NOT_FOUND", _update_schedule_bad(
            bpb.BonusSchedule(schedule_id="nope", local_time="09:00"), "local_time")),
        v("time_zone Mars/Phobos", "INVALID_ARGUMENT", "INVALID_TIME_ZONE",
          _update_schedule_bad(bpb.BonusSchedule(schedule_id="daily", time_zone="Mars/Phobos"),
                               "time_zone")),
    )),
]


# --- JobService --------------------------------------------------------------------------------

async def _retry_job(w: World, n: int) -> Request:
    return jpb.RetryJobRequest(job_id=await fz.dead_job(w))


async def _job(w: World, *, kind: str, dead: bool) -> str:
    async with w.pool.acquire() as conn:
        job_id = await outbox_repo.add_job(conn, kind=kind, payload={"campaign": 999998})
        if dead:
            await conn.execute("UPDATE outbox_jobs SET status = 'dead', finished_at = $1, "
                               "last_error = 'x' WHERE id = $2", w.clock.now(), job_id)
    return str(job_id)


def _retry_bad(job: Callable[[World], Awaitable[str]] | str
               ) -> Callable[[World, int], Awaitable[Pair]]:
    async def make(w: World, n: int) -> Pair:
        job_id = job if isinstance(job, str) else await job(w)
        return jpb.RetryJobRequest(job_id=job_id), await _retry_job(w, n)
    return make


JOB_CASES = [
    Case("JobService/RetryJob", "admin", _retry_job, (
        v("a PENDING job", "FAILED_PRECONDITION", "JOB_NOT_DEAD",
          _retry_bad(lambda w: _job(w, kind="campaign.notify", dead=False))),
        v("a dead webhook delivery job", "FAILED_PRECONDITION", "USE_REDELIVER_EVENT",
          _retry_bad(lambda w: _job(w, kind=webhooks_repo.DELIVER_KIND, dead=True))),
        v("an unknown job", "NOT_FOUND", "JOB_NOT_FOUND", _retry_bad("99999999")),
        v("job_id 'abc'", "INVALID_ARGUMENT", "INVALID_ID", _retry_bad("abc")),
    )),
]


CASES = [*REWARD_TYPE_CASES, *PROMOTION_CASES, *REWARD_CASES, *CODE_CASES, *CUSTOMER_CASES,
         *CAMPAIGN_CASES, *LISTENER_CASES, *PRODUCT_CASES, *BONUS_CASES, *JOB_CASES]
SERVICES = sorted({RPCS[c.rpc].service for c in CASES})


def test_every_mutating_rpc_has_a_case() -> None:
    """A new mutating RPC (a request with request_id) cannot be forgotten here."""
    assert len(MUTATING) >= 40
    assert sorted(c.rpc for c in CASES) == MUTATING
    assert all(len(c.variants) >= 1 for c in CASES)
    assert all(c.role in METHOD_ROLES[RPCS[c.rpc].path] | {"admin"} for c in CASES)


# --- the check ---------------------------------------------------------------------------------

async def check(w: World, case: Case, problems: list[str], notes: list[str]) -> int:
    calls = 0
    for variant in [*generic(case), *case.variants]:
        where = f"{case.rpc} [{variant.label}]"
        n = w.n()
        request_id = f"rf{n}-{uuid.uuid4().hex[:10]}"
        bad, fixed = await variant.prepare(w, n, request_id)
        await settle()
        before, ids_before = await snapshot(w.pool), await sequences(w.pool)
        outcome = await call(w, case.rpc, bad, variant.role or case.role)
        await settle()
        after, ids_after = await snapshot(w.pool), await sequences(w.pool)
        calls += 1
        if (outcome.code, outcome.reason) != (variant.code, variant.reason):
            problems.append(f"{where}: expected {variant.code} {variant.reason}, got {outcome}")
        if changed := table_diff(before, after):
            problems.append(f"{where}: the refused call ({outcome.code} {outcome.reason}) "
                            f"changed the database:\n{show_diff(changed)}")
        burned = {name: (ids_before.get(name), value) for name, value in ids_after.items()
                  if value != ids_before.get(name)}
        if burned:
            notes.append(f"{where}: {outcome.code} consumed ids: " + ", ".join(
                f"{name} {old} -> {new}" for name, (old, new) in sorted(burned.items())))
        if fixed is not None:
            retry = await call(w, case.rpc, fixed, case.role)
            calls += 1
            if retry.code != "OK":
                problems.append(f"{where}: the same request_id with the payload fixed was "
                                f"refused: {retry}")
    return calls


@pytest.mark.parametrize("service", SERVICES)
async def test_refused_calls_change_nothing(service: str, pool: asyncpg.Pool, clock: FixedClock,
                                            settings: Settings) -> None:
    problems: list[str] = []
    notes: list[str] = []
    calls = 0
    async with fz.world(settings, pool, clock) as w:
        for case in CASES:
            if RPCS[case.rpc].service == service:
                calls += await check(w, case, problems, notes)
    if notes:
        print(f"\n{service}: refusals that consumed sequence values (allowed, not compared):")
        print("\n".join(f"  {note}" for note in notes))
    assert not problems, f"{len(problems)} problems in {calls} calls:\n" + "\n".join(problems)


# --- denials: an answer, not a refusal, but all or nothing too ---------------------------------

async def test_denied_grants_change_nothing(pool: asyncpg.Pool, clock: FixedClock,
                                            settings: Settings) -> None:
    """GetReward answers a cap or an empty pool with OK and a denial reason, not an error; the
    grant is still all or nothing (DESIGN invariant 1): a denial found after promo_grant
    inserted the grant and charged earlier scopes leaves every table as it was."""
    problems: list[str] = []
    notes: list[str] = []
    async with fz.world(settings, pool, clock) as w:
        budget = fz.vip_promotion("BUDGET")
        del budget.budget_caps[:]
        budget.budget_caps.extend([
            ppb.BudgetCap(reward_type="cashback", period=ppb.CAP_PERIOD_DAILY, limit="1000"),
            ppb.BudgetCap(reward_type="cashback", period=ppb.CAP_PERIOD_LIFETIME, limit="20")])
        customers = fz.vip_promotion("CUSTCAP")
        customers.customer_cap = 1
        codes = ppb.Promotion(promotion_code="ONECODE", name="One code",
                              code_type=ppb.CODE_TYPE_PERSONALIZED, rewards=[
                                  ppb.PromotionReward(reward_type="percent_off",
                                                      kind=ppb.REWARD_KIND_EXTERNAL)])
        for promotion in (budget, customers, codes):
            await fz.create_promotion(w, promotion, activate=True)
        await ok(w, "CodePoolService/UploadCodes", [codepb.UploadCodesRequest(
            promotion_code="ONECODE", data=b"ONLY-1\n")])
        for code, denial in (("BUDGET", rpb.DENIAL_REASON_BUDGET_CAP_REACHED),
                             ("CUSTCAP", rpb.DENIAL_REASON_CUSTOMER_CAP_REACHED),
                             ("ONECODE", rpb.DENIAL_REASON_OUT_OF_CODES)):
            first = await fz.get_reward(w, code, f"{code}-first")
            assert first.HasField("grant"), (code, first)
            await settle()
            before, ids_before = await snapshot(w.pool), await sequences(w.pool)
            second = await w.ok("RewardService/GetReward", rpb.GetRewardRequest(
                request_id=fz.rid(code), promotion_code=code, customer_id=f"{code}-second"),
                "runtime")
            await settle()
            after, ids_after = await snapshot(w.pool), await sequences(w.pool)
            where = f"GetReward denied on {code}"
            if second.HasField("grant") or second.denial_reason != denial:
                problems.append(f"{where}: expected {rpb.DenialReason.Name(denial)}, got "
                                f"{second}")
            if changed := table_diff(before, after):
                problems.append(f"{where}: the denial changed the database:\n"
                                f"{show_diff(changed)}")
            notes += [f"{where}: consumed ids: {name} {ids_before.get(name)} -> {value}"
                      for name, value in ids_after.items() if value != ids_before.get(name)]
    if notes:
        print("\ndenials that consumed sequence values (allowed, not compared):")
        print("\n".join(f"  {note}" for note in notes))
    assert not problems, "\n".join(problems)
