"""PromotionService: catalogue of promotions, their lifecycle, live cap usage, reconciliation."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace
from datetime import datetime
from decimal import Decimal

import asyncpg
from google.protobuf.message import Message
from grpc import aio

from core.cap_state import CUSTOMERS_SCOPE, availability, cap_states, windows
from core.caps import LIFETIME_START
from core.catalogue import promotions as domain
from core.catalogue.promotions import CapPeriod, Promotion, PromotionStatus
from core.catalogue.reward_types import RewardType
from core.clock import Clock
from core.codes import CodeType
from core.errors import InvalidArgument
from core.money import format_decimal
from core.pagination import effective_page_size
from core.reward_formulas import compile_rewards, stored_forms
from promo.v1 import promotions_pb2 as pb
from promo.v1 import promotions_pb2_grpc as pb_grpc
from server.code_alerts import AlertDispatcher
from server.convert import required_id, run_request_once, timestamp
from server.deps import Dependencies
from server.grant_batcher import DEADLOCK_ATTEMPTS
from server.page_bytes import fit_page
from server.page_tokens import decode_page_token, encode_page_token
from server.promotion_convert import (
    KIND_FROM_PB,
    PERIOD_TO_PB,
    STATUS_FROM_PB,
    inventory_to_pb,
    promotion_from_pb,
    promotion_to_pb,
)
from storage import code_pools
from storage import promotions as repo
from storage import reward_types as reward_types_repo
from storage.promotions import StoredPromotion

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["PromotionService"].full_name
ROLES = {f"/{SERVICE_NAME}/{m.name}": {"admin"}
         for m in pb.DESCRIPTOR.services_by_name["PromotionService"].methods}
UPDATABLE = frozenset({"name", "description", "properties", "time_zone", "rewards",
                       "customer_cap", "budget_caps", "code_type", "fallback_code",
                       "code_alerts"})
_AVAILABILITY_TO_PB = {"AVAILABLE": pb.AVAILABILITY_AVAILABLE,
                       "NOT_ACTIVE": pb.AVAILABILITY_NOT_ACTIVE,
                       "CAPPED_FOR_PERIOD": pb.AVAILABILITY_CAPPED_FOR_PERIOD,
                       "BUDGET_EXHAUSTED": pb.AVAILABILITY_BUDGET_EXHAUSTED,
                       "CUSTOMER_CAP_REACHED": pb.AVAILABILITY_CUSTOMER_CAP_REACHED,
                       "OUT_OF_CODES": pb.AVAILABILITY_OUT_OF_CODES}


async def _reward_types(conn: asyncpg.Connection, promotion: Promotion) -> dict[str, RewardType]:
    """The reward types the promotion names that exist (validation reports the missing ones)."""
    return await reward_types_repo.get_many(conn, [r.reward_type for r in promotion.rewards])


async def with_usage(conn: asyncpg.Connection, stored: StoredPromotion,
                     now: datetime) -> pb.Promotion:
    """The promotion as operators see it: config plus live caps and availability."""
    return (await with_usage_many(conn, [stored], now))[0]


async def with_usage_many(conn: asyncpg.Connection, stored: list[StoredPromotion],
                          now: datetime) -> list[pb.Promotion]:
    """Several promotions as operators see them, their live state read in three statements."""
    current = {s.id: windows(s.promotion, now) for s in stored}
    states = await repo.live_states(conn, {
        pid: [(scope, period.value, start) for scope, period, start, _, _ in ws]
        for pid, ws in current.items()})
    return [_shown(s, states[s.id], now) for s in stored]


def _shown(stored: StoredPromotion, live: repo.LiveState, now: datetime) -> pb.Promotion:
    promotion = stored.promotion
    used = {key: (row.used, row.grants) for key, row in live.usage.items()}
    states = cap_states(promotion, now, used)
    message = promotion_to_pb(promotion)
    codes = live.codes if promotion.code_type is CodeType.PERSONALIZED else None
    if codes is not None:
        message.code_inventory.CopyFrom(inventory_to_pb(codes))
        message.fallback_active = codes.available == 0 and bool(promotion.fallback_code)
    message.availability = _AVAILABILITY_TO_PB[availability(
        promotion, states, codes_available=None if codes is None else codes.available).value]
    message.customers = live.customers
    for state in states:
        usage = message.cap_usage.add(scope=state.scope, period=PERIOD_TO_PB[state.period],
                                      used=format_decimal(state.used.normalize()
                                                          if state.used else Decimal(0)),
                                      limit=format_decimal(state.limit), grants=state.grants,
                                      reached=state.reached)
        usage.period_start.FromDatetime(state.start)
        if state.end is not None:
            usage.period_end.FromDatetime(state.end)
    return message


log = logging.getLogger("promo.promotions")

# The line each change leaves (inside its transaction: a replayed request logs nothing more).
_CHANGE_LOG = {"CreatePromotion": "promotion created", "UpdatePromotion": "promotion updated",
               "ActivatePromotion": "promotion activated",
               "DeactivatePromotion": "promotion deactivated"}


class PromotionServicer(pb_grpc.PromotionServiceServicer):
    def __init__(self, pool: asyncpg.Pool, clock: Clock, alerts: AlertDispatcher) -> None:
        self._pool = pool
        self._clock = clock
        self._alerts = alerts

    async def _once(self, scope: str, request: Message,
                    work: Callable[[asyncpg.Connection], Awaitable[pb.Promotion]],
                    response_type: type[Message], *, fields: list[str] | None = None) -> Message:
        async def run(conn: asyncpg.Connection) -> bytes:
            promotion = await work(conn)
            log.info(_CHANGE_LOG[scope], extra={
                "promotion_code": promotion.promotion_code, "version": promotion.version,
                "status": pb.PromotionStatus.Name(promotion.status).removeprefix(
                    "PROMOTION_STATUS_"),
                **({"fields": ",".join(sorted(fields))} if fields else {})})
            return response_type(promotion=promotion).SerializeToString()  # type: ignore[call-arg]

        # A cap recount (UpdatePromotion) can meet a grant batch's counter locks in the other
        # order; PostgreSQL aborts one side, and the whole transaction simply runs again.
        raw = await run_request_once(self._pool, scope, request, run,
                                     deadlock_attempts=DEADLOCK_ATTEMPTS)
        return response_type.FromString(raw)

    async def _sync_codes(self, conn: asyncpg.Connection, stored: StoredPromotion,
                          raised: list[int]) -> None:
        """A PERSONALIZED promotion's pool follows its settings; an alert this raises (a new
        threshold already breached) is dispatched after commit."""
        raised.append(await code_pools.sync_pool(conn, stored.id, stored.promotion,
                                                 self._clock.now()))

    async def CreatePromotion(self, request: pb.CreatePromotionRequest,
                              context: aio.ServicerContext) -> pb.CreatePromotionResponse:
        draft = promotion_from_pb(request.promotion)
        status = PromotionStatus.ACTIVE if request.activate else PromotionStatus.DRAFT

        async def work(conn: asyncpg.Connection) -> pb.Promotion:
            raised.clear()  # an attempt aborted by a deadlock raised nothing
            promotion = domain.validate_promotion(draft, await _reward_types(conn, draft))
            stored = await repo.insert(conn, replace(promotion, status=status),
                                       formulas=stored_forms(compile_rewards(promotion)))
            await self._sync_codes(conn, stored, raised)
            return await with_usage(conn, stored, self._clock.now())

        raised: list[int] = []
        response = await self._once("CreatePromotion", request, work,
                                    pb.CreatePromotionResponse)
        if any(raised):
            self._alerts.dispatch_soon()
        assert isinstance(response, pb.CreatePromotionResponse)
        return response

    async def GetPromotion(self, request: pb.GetPromotionRequest,
                           context: aio.ServicerContext) -> pb.GetPromotionResponse:
        required_id(request.promotion_code, "promotion_code")
        async with self._pool.acquire() as conn:
            stored = await repo.get(conn, request.promotion_code)
            return pb.GetPromotionResponse(
                promotion=await with_usage(conn, stored, self._clock.now()))

    async def ListPromotions(self, request: pb.ListPromotionsRequest,
                             context: aio.ServicerContext) -> pb.ListPromotionsResponse:
        size = effective_page_size(request.page_size)
        statuses = sorted({STATUS_FROM_PB[s].value for s in request.statuses
                           if s in STATUS_FROM_PB})
        kinds = sorted({KIND_FROM_PB[k].value for k in request.reward_kinds if k in KIND_FROM_PB})
        bad_status = len(statuses) != len(set(request.statuses))
        if bad_status or len(kinds) != len(set(request.reward_kinds)):
            raise InvalidArgument("statuses and reward_kinds must not contain UNSPECIFIED",
                                  reason="INVALID_ENUM", metadata={"field": "statuses"})
        filters = {"search": request.search, "statuses": statuses, "kinds": kinds}
        cursor = decode_page_token(request.page_token, filters, key=(str,))
        now = self._clock.now()
        async with self._pool.acquire() as conn:
            rows = await repo.list_page(conn, after_code=str(cursor.after[0]) if cursor else None,
                                        limit=size + 1, search=request.search,
                                        statuses=statuses, kinds=kinds)
            messages = await with_usage_many(conn, rows[:size], now)
        kept, promotions, more = fit_page(messages, len(rows) > size, lambda m: m)
        token = encode_page_token([rows[len(kept) - 1].promotion.code], filters) if more else ""
        return pb.ListPromotionsResponse(promotions=promotions, next_page_token=token)

    async def UpdatePromotion(self, request: pb.UpdatePromotionRequest,
                              context: aio.ServicerContext) -> pb.UpdatePromotionResponse:
        paths = list(request.update_mask.paths)
        if not paths:
            raise InvalidArgument("update_mask must name at least one field",
                                  reason="EMPTY_UPDATE_MASK", metadata={"field": "update_mask"})
        unknown = sorted(set(paths) - UPDATABLE)
        if unknown:
            hint = " (the promotion code never changes)" if "promotion_code" in unknown else ""
            raise InvalidArgument(
                f"update_mask names fields that cannot be updated: {', '.join(unknown)}{hint}; "
                f"updatable: {', '.join(sorted(UPDATABLE))}", reason="INVALID_UPDATE_MASK",
                metadata={"field": "update_mask"})
        required_id(request.promotion.promotion_code, "promotion.promotion_code")
        patch = promotion_from_pb(request.promotion)

        async def work(conn: asyncpg.Connection) -> pb.Promotion:
            raised.clear()  # an attempt aborted by a deadlock raised nothing
            stored = await repo.get(conn, request.promotion.promotion_code, for_update=True)
            domain.check_editable(stored.promotion)
            merged = replace(stored.promotion, **{p: getattr(patch, p) for p in paths})
            promotion = domain.validate_promotion(merged, await _reward_types(conn, merged))
            saved = await repo.save(conn, stored.id, promotion,
                                    formulas=stored_forms(compile_rewards(promotion)),
                                    recount_at=self._clock.now())
            await self._sync_codes(conn, saved, raised)
            return await with_usage(conn, saved, self._clock.now())

        raised: list[int] = []
        response = await self._once("UpdatePromotion", request, work,
                                    pb.UpdatePromotionResponse, fields=paths)
        if any(raised):
            self._alerts.dispatch_soon()
        assert isinstance(response, pb.UpdatePromotionResponse)
        return response

    async def _transition(self, scope: str, request: Message, code: str,
                          target: PromotionStatus, response_type: type[Message]) -> Message:
        required_id(code, "promotion_code")
        async def work(conn: asyncpg.Connection) -> pb.Promotion:
            stored = await repo.get(conn, code, for_update=True)
            domain.check_transition(stored.promotion.status, target,
                                    code=stored.promotion.code)
            if target is PromotionStatus.ACTIVE:  # reward types may have changed since
                domain.validate_promotion(stored.promotion,
                                          await _reward_types(conn, stored.promotion))
            saved = await repo.save(conn, stored.id, replace(stored.promotion, status=target))
            return await with_usage(conn, saved, self._clock.now())

        return await self._once(scope, request, work, response_type)

    async def ActivatePromotion(self, request: pb.ActivatePromotionRequest,
                                context: aio.ServicerContext) -> pb.ActivatePromotionResponse:
        response = await self._transition("ActivatePromotion", request, request.promotion_code,
                                          PromotionStatus.ACTIVE,
                                          pb.ActivatePromotionResponse)
        assert isinstance(response, pb.ActivatePromotionResponse)
        return response

    async def DeactivatePromotion(self, request: pb.DeactivatePromotionRequest,
                                  context: aio.ServicerContext) -> pb.DeactivatePromotionResponse:
        response = await self._transition("DeactivatePromotion", request,
                                          request.promotion_code,
                                          PromotionStatus.DEACTIVATED,
                                          pb.DeactivatePromotionResponse)
        assert isinstance(response, pb.DeactivatePromotionResponse)
        return response

    async def GetPromotionReconciliation(
            self, request: pb.GetPromotionReconciliationRequest,
            context: aio.ServicerContext) -> pb.GetPromotionReconciliationResponse:
        required_id(request.promotion_code, "promotion_code")
        async with self._pool.acquire() as conn:
            stored = await repo.get(conn, request.promotion_code)
            rows = await repo.reconciliation(conn, stored.id)
            customers = await repo.customer_reconciliation(conn, stored.id)
        limits = {(c.reward_type, c.period.value): c.limit for c in stored.promotion.budget_caps}
        response = pb.GetPromotionReconciliationResponse()
        cap = stored.promotion.customer_cap
        if customers["granted_count"] and cap is not None:
            # The customer cap's one window: customers granted, customers whose every grant
            # was revoked, and the live customers against the "#customers" counter. Only while
            # a customer cap is set: without one the counter is not kept (README "Caps after an
            # edit"), so comparing it would raise a false alarm.
            granted, revoked = customers["granted_count"], customers["revoked_count"]
            counter = customers["counter_used"]
            out = response.rows.add(
                scope=CUSTOMERS_SCOPE, period=PERIOD_TO_PB[CapPeriod.LIFETIME],
                granted_count=granted, granted_amount=str(granted), revoked_count=revoked,
                revoked_amount=str(revoked), net_amount=str(granted - revoked),
                limit=str(cap),
                counter_matches=counter is not None and counter == granted - revoked)
            out.period_start.CopyFrom(timestamp(LIFETIME_START))
        for row in rows:
            net = row["granted_amount"] - row["revoked_amount"]
            counter = row["counter_used"]
            out = response.rows.add(
                scope=row["scope"], period=PERIOD_TO_PB[CapPeriod(row["period"])],
                granted_count=row["granted_count"],
                granted_amount=format_decimal(row["granted_amount"]),
                revoked_count=row["revoked_count"],
                revoked_amount=format_decimal(row["revoked_amount"]),
                net_amount=format_decimal(net),
                limit=format_decimal(limits.get((row["scope"], row["period"]))),
                counter_matches=counter is not None and counter == net)
            out.period_start.CopyFrom(timestamp(row["period_start"]))
        return response



def register(server: aio.Server, deps: Dependencies) -> None:
    pb_grpc.add_PromotionServiceServicer_to_server(
        PromotionServicer(deps.pool, deps.clock, AlertDispatcher(deps)), server)
