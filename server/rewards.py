"""RewardService: GetReward (the hot path) and RevokeGrant.

GetReward reads the promotion from the in-memory cache, decides each reward's value, computes
the cap charges, and makes one database round trip (promo_grant), which checks the cached
version, returns an existing grant for a retry, or inserts the grant and charges every cap,
all or nothing. A STALE answer reloads the configuration and tries again.

An EXISTING answer (a retry, or a customer who already holds the grant) is checked against
the request before it is given: a request id that made a grant for another customer, another
campaign or other external values is a different request, refused as REQUEST_ID_REUSED. That
check reads the grant's keys in a query of its own, on the EXISTING path only; a new grant
costs what it did.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import replace
from decimal import Decimal
from typing import Any

import asyncpg
from grpc import aio

from core.caps import LIFETIME_START
from core.catalogue.promotions import RewardKind
from core.clock import Clock
from core.codes import CodeType
from core.errors import Aborted, InvalidArgument, NotFound
from core.money import format_decimal, parse_decimal
from core.reward_formulas import evaluate_reward
from core.rewards import Denial, charges_for, decide_values
from core.text import nul_problem
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import rewards_pb2 as pb
from promo.v1 import rewards_pb2_grpc as pb_grpc
from server.activation_context import loggable_context
from server.code_alerts import AlertDispatcher
from server.convert import required_id, run_request_once, timestamp
from server.deps import Dependencies
from server.grant_batcher import DEADLOCK_ATTEMPTS, GrantBatcher
from server.logs import annotate_call
from server.metrics import observe_reward
from server.promotion_cache import CachedPromotion, PromotionCache
from server.promotion_convert import KIND_TO_PB, PERIOD_TO_PB
from storage import aggregates as aggregates_repo
from storage import campaigns as campaigns_repo
from storage import customers as customers_repo
from storage import promotions as repo
from storage.idempotency import validate_request_id
from storage.promotions import GrantCharge, GrantKeys, GrantOutcome, GrantRequest

log = logging.getLogger("promo.rewards")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["RewardService"].full_name
ROLES = {f"/{SERVICE_NAME}/GetReward": {"runtime"}, f"/{SERVICE_NAME}/RevokeGrant": {"runtime"}}
MAX_ID_LENGTH = 128
_DENIALS = {"NOT_ACTIVE": pb.DENIAL_REASON_NOT_ACTIVE,
            "CUSTOMER_CAP_REACHED": pb.DENIAL_REASON_CUSTOMER_CAP_REACHED,
            "BUDGET_CAP_REACHED": pb.DENIAL_REASON_BUDGET_CAP_REACHED,
            "NOT_ELIGIBLE": pb.DENIAL_REASON_NOT_ELIGIBLE,
            "BELOW_MINIMUM": pb.DENIAL_REASON_BELOW_MINIMUM,
            "OUT_OF_CODES": pb.DENIAL_REASON_OUT_OF_CODES}
_PERIODS = {p.value: v for p, v in PERIOD_TO_PB.items()}
# ASCII digits only: str.isdigit() also accepts "²" and Arabic-Indic digits, which int()
# rejects or reads as another number.
_GRANT_ID = re.compile(r"[0-9]{1,18}")


def _external_values(rewards: list[dict[str, Any]]) -> dict[str, Decimal]:
    """The external values a grant was made with, by reward type."""
    return {r["reward_type"]: Decimal(r["value"]) for r in rewards
            if r["kind"] == RewardKind.EXTERNAL.value and r["value"] is not None}


def _check_same_request(keys: GrantKeys, rewards: list[dict[str, Any]],
                        request: pb.GetRewardRequest, external: Mapping[str, Decimal]) -> None:
    """An existing grant answers this request only if the request is a retry of the one that
    made it (same customer, campaign and external values), or names its customer and
    campaign under another request id (a customer who already holds the grant)."""
    if keys.request_id != request.request_id:
        return  # found by customer and campaign, which the request names
    if (keys.customer_id, keys.campaign_key) != (request.customer_id, request.campaign_id) \
            or _external_values(rewards) != dict(external):
        raise InvalidArgument(
            f"request_id {request.request_id!r} was already used for a different request; "
            "use a new request_id for a new request", reason="REQUEST_ID_REUSED",
            metadata={"field": "request_id"})


def _logged(request: pb.GetRewardRequest,
            response: pb.GetRewardResponse) -> pb.GetRewardResponse:
    """The call's access line names the promotion, customer, campaign and outcome (the grant,
    or the denial's reason), so a grant or a denial can be found in the log."""
    fields = {"promotion_code": request.promotion_code, "customer_id": request.customer_id}
    if request.campaign_id:
        fields["campaign_id"] = request.campaign_id
    if response.HasField("grant"):
        fields["outcome"] = "existing" if response.existing else "granted"
        fields["grant_id"] = response.grant.grant_id
    else:
        fields["outcome"] = "denied"
        fields["denial"] = pb.DenialReason.Name(response.denial_reason).removeprefix(
            "DENIAL_REASON_")
    annotate_call(fields)
    return response


def _check_id(value: str, field: str, *, required: bool = True) -> str:
    if required:
        required_id(value, field)
    if len(value) > MAX_ID_LENGTH:
        raise InvalidArgument(
            f"{field} is {'required' if required else 'optional'} (1-{MAX_ID_LENGTH} characters)",
            reason="INVALID_ID", metadata={"field": field})
    if (problem := nul_problem(value, field)) is not None:
        raise InvalidArgument(problem, reason="INVALID_ID", metadata={"field": field})
    return value


def _parse_grant_id(value: str) -> int:
    required_id(value, "grant_id")
    if not _GRANT_ID.fullmatch(value):
        raise InvalidArgument(f"grant_id {value!r} is not a grant id", reason="INVALID_ID",
                              metadata={"field": "grant_id"})
    return int(value)


class RewardServicer(pb_grpc.RewardServiceServicer):
    def __init__(self, pool: asyncpg.Pool, clock: Clock, cache: PromotionCache,
                 alerts: AlertDispatcher, batcher: GrantBatcher) -> None:
        self._pool = pool
        self._batcher = batcher
        self._clock = clock
        self._cache = cache
        self._alerts = alerts

    async def GetReward(self, request: pb.GetRewardRequest,
                        context: aio.ServicerContext) -> pb.GetRewardResponse:
        _check_id(request.promotion_code, "promotion_code")
        _check_id(request.customer_id, "customer_id")
        validate_request_id(request.request_id)
        _check_id(request.campaign_id, "campaign_id", required=False)
        external: dict[str, Decimal] = {}
        for name, text in request.external_values.items():
            value = parse_decimal(text, field=f"external_values[{name}]")
            assert value is not None
            external[name] = value
        if request.context:
            log.info("get reward context", extra={
                "promotion_code": request.promotion_code, "customer_id": request.customer_id,
                "activation_context": loggable_context(request.context)})
        for _ in range(3):
            cached = await self._cache.get(request.promotion_code)
            outcome = await self._grant(cached, request, external)
            if isinstance(outcome, pb.GetRewardResponse):
                return _logged(request, observe_reward(outcome))
            if outcome.outcome == "STALE":
                self._cache.invalidate(request.promotion_code)
                continue
            if outcome.outcome == "EXISTING":
                outcome = await self._existing(outcome, request, external)
            return _logged(request, observe_reward(self._answer(cached, request, outcome)))
        raise Aborted("the promotion changed repeatedly during this call; retry it",
                      reason="CONFIG_CHANGING")

    async def _grant(self, cached: CachedPromotion, request: pb.GetRewardRequest,
                     external: dict[str, Decimal]) -> GrantOutcome | pb.GetRewardResponse:
        promotion = cached.stored.promotion
        unknown = sorted(set(external) - {r.reward_type for r in promotion.rewards
                                          if r.kind is RewardKind.EXTERNAL})
        if unknown:
            raise InvalidArgument(f"external_values names reward types that are not EXTERNAL "
                                  f"rewards of this promotion: {', '.join(unknown)}",
                                  reason="INVALID_EXTERNAL_VALUE",
                                  metadata={"field": "external_values"})
        if request.campaign_id:
            async with self._pool.acquire() as conn:
                verdict = await campaigns_repo.eligibility(
                    conn, request.campaign_id, cached.stored.id, request.customer_id)
            if verdict is not None and verdict != "ELIGIBLE":
                return await self._denied(cached, request, pb.GetRewardResponse(
                    denial_reason=pb.DENIAL_REASON_NOT_ELIGIBLE, denial_message=verdict))
        computed = await self._computed(cached, request)
        decided = decide_values(promotion, cached.reward_types, computed=computed,
                                external_values=external)
        now = self._clock.now()
        if isinstance(decided, Denial):
            return await self._denied(cached, request, pb.GetRewardResponse(
                denial_reason=_DENIALS[decided.reason], denial_message=decided.message))
        rewards = [{"reward_type": v.reward_type, "kind": v.kind.value,
                    # Plain notation ("1e2" sent as an external value is "100", not "1E+2").
                    "value": None if v.value is None else format_decimal(v.value)}
                   for v in decided]
        charges = [GrantCharge(c.scope, c.period.value, c.start, c.amount, c.limit)
                   for c in charges_for(promotion, decided, now)]
        return await self._batcher.grant(GrantRequest(
            promotion_id=cached.stored.id, version=promotion.version,
            customer_id=request.customer_id, campaign_key=request.campaign_id,
            request_id=request.request_id, rewards=rewards, promo_code=promotion.code,
            now=now, customer_cap=promotion.customer_cap,
            customers_start=LIFETIME_START, charges=charges,
            personalized=promotion.code_type is CodeType.PERSONALIZED,
            fallback_code=promotion.fallback_code))

    async def _denied(self, cached: CachedPromotion, request: pb.GetRewardRequest,
                      denial: pb.GetRewardResponse) -> GrantOutcome | pb.GetRewardResponse:
        """A denial, unless the request id (or this customer in this campaign) already has a
        grant: a retry gets its earlier grant back even when the promotion, the campaign or the
        customer's data would deny it now, and a request id reused for another customer is
        REQUEST_ID_REUSED, not a denial. Asks the database, charging nothing."""
        async with self._pool.acquire() as conn:
            existing = await repo.find_existing(
                conn, promotion_id=cached.stored.id, customer_id=request.customer_id,
                campaign_key=request.campaign_id, request_id=request.request_id)
        return denial if existing is None else existing

    async def _existing(self, outcome: GrantOutcome, request: pb.GetRewardRequest,
                        external: Mapping[str, Decimal]) -> GrantOutcome:
        """The existing grant with its keys, once it is known to answer this request."""
        assert outcome.grant_id is not None and outcome.rewards is not None
        keys = outcome.keys
        if keys is None:
            async with self._pool.acquire() as conn:
                keys = await repo.grant_keys(conn, outcome.grant_id)
        _check_same_request(keys, outcome.rewards, request, external)
        return replace(outcome, keys=keys)

    async def _computed(self, cached: CachedPromotion,
                        request: pb.GetRewardRequest) -> dict[str, Decimal | Denial]:
        """Evaluate the TIERED and CALCULATED rewards for this customer: their properties and,
        per formula, every aggregate it needs in one statement over the lookback window."""
        if not cached.formulas:
            return {}
        now = self._clock.now()
        async with self._pool.acquire() as conn:
            try:
                customer = await customers_repo.get(conn, request.customer_id)
                properties, currency = dict(customer.properties), customer.currency
            except NotFound:
                properties, currency = {}, None
            values: dict[str, Decimal | Denial] = {}
            for reward_type, formula in cached.formulas.items():
                specs = formula.compiled.aggregates
                found = await aggregates_repo.aggregate_for_customers(
                    conn, specs, [request.customer_id], now - formula.lookback, now) \
                    if specs else {}
                values[reward_type] = evaluate_reward(
                    formula, aggregates=found.get(request.customer_id, {}),
                    properties=properties, currency=currency)
        return values

    def _answer(self, cached: CachedPromotion, request: pb.GetRewardRequest,
                outcome: GrantOutcome) -> pb.GetRewardResponse:
        promotion = cached.stored.promotion
        if outcome.outcome == "NOT_FOUND":
            self._cache.invalidate(request.promotion_code)
            raise NotFound(f"no promotion with code {request.promotion_code!r}",
                           reason="PROMOTION_NOT_FOUND",
                           metadata={"promotion_code": request.promotion_code})
        if outcome.alert:
            self._alerts.dispatch_soon()
        if outcome.outcome in ("GRANTED", "EXISTING"):
            assert outcome.grant_id is not None and outcome.rewards is not None
            # An existing grant is shown as stored (its keys were checked against the request).
            keys = outcome.keys or GrantKeys(request.customer_id, request.campaign_id,
                                             request.request_id)
            grant = pb.Grant(
                grant_id=str(outcome.grant_id), promotion_code=promotion.code,
                customer_id=keys.customer_id, campaign_id=keys.campaign_key,
                promo_code=outcome.promo_code or promotion.code,
                properties=dict(promotion.properties), granted_at=timestamp(outcome.granted_at),
                revoked=outcome.grant_status == "REVOKED", fallback_code=outcome.fallback)
            for reward in outcome.rewards:
                reward_type = cached.reward_types.get(reward["reward_type"])
                grant.rewards.add(
                    reward_type=reward["reward_type"],
                    display_name=reward_type.display_name if reward_type else "",
                    kind=KIND_TO_PB[RewardKind(reward["kind"])],
                    value=reward["value"] or "")
            return pb.GetRewardResponse(grant=grant, existing=outcome.outcome == "EXISTING")
        if outcome.outcome == "NOT_ACTIVE":
            return pb.GetRewardResponse(
                denial_reason=pb.DENIAL_REASON_NOT_ACTIVE,
                denial_message=f"promotion {promotion.code} is {outcome.grant_status}")
        if outcome.outcome == "CUSTOMER_CAP_REACHED":
            return pb.GetRewardResponse(
                denial_reason=pb.DENIAL_REASON_CUSTOMER_CAP_REACHED,
                denial_message=f"promotion {promotion.code} reached its cap of "
                               f"{promotion.customer_cap} customers")
        if outcome.outcome == "BUDGET_CAP_REACHED":
            period = outcome.denied_period or ""
            return pb.GetRewardResponse(
                denial_reason=pb.DENIAL_REASON_BUDGET_CAP_REACHED,
                denial_message=f"the {period.lower()} budget cap of {outcome.denied_scope} "
                               f"would be exceeded",
                denied_scope=outcome.denied_scope or "",
                denied_period=_PERIODS.get(period, ppb.CAP_PERIOD_UNSPECIFIED))
        if outcome.outcome == "OUT_OF_CODES":
            return pb.GetRewardResponse(
                denial_reason=pb.DENIAL_REASON_OUT_OF_CODES,
                denial_message=f"promotion {promotion.code} has handed out every personalized "
                               "code and has no fallback code; it resumes when codes are "
                               "uploaded")
        raise RuntimeError(f"unexpected grant outcome {outcome.outcome}")

    async def RevokeGrant(self, request: pb.RevokeGrantRequest,
                          context: aio.ServicerContext) -> pb.RevokeGrantResponse:
        validate_request_id(request.request_id)
        grant_id = _parse_grant_id(request.grant_id)
        if len(request.reason) > 1000:
            raise InvalidArgument("reason is at most 1000 characters", reason="INVALID_REASON",
                                  metadata={"field": "reason"})

        async def work(conn: asyncpg.Connection) -> bytes:
            outcome = await repo.revoke(conn, grant_id, reason=request.reason,
                                        now=self._clock.now())
            if outcome == "NOT_FOUND":
                raise NotFound(f"no grant {request.grant_id}", reason="GRANT_NOT_FOUND",
                               metadata={"grant_id": request.grant_id})
            log.info("grant revoke", extra={"grant_id": grant_id, "outcome": outcome})
            return pb.RevokeGrantResponse(revoked=outcome == "REVOKED").SerializeToString()

        # Once per request id, like every mutating call: a retry gets the first answer (even
        # "revoked" after the grant is gone), the id reused for another grant or reason is
        # REQUEST_ID_REUSED and changes nothing.
        # A revoke and a grant of the same customer can deadlock (their SQL functions lock the
        # customer's rows and the cap counters in different orders): PostgreSQL aborts one,
        # which is run again rather than answered INTERNAL.
        raw = await run_request_once(self._pool, "RevokeGrant", request, work,
                                     deadlock_attempts=DEADLOCK_ATTEMPTS)
        return pb.RevokeGrantResponse.FromString(raw)


def register(server: aio.Server, deps: Dependencies) -> None:
    cache = PromotionCache(deps.pool)
    settings = deps.settings
    batcher = GrantBatcher(
        deps.pool, max_batch=settings.grant_batch_max if settings else 32,
        max_in_flight=settings.grant_batches_in_flight if settings else 2)
    servicer = RewardServicer(deps.pool, deps.clock, cache, AlertDispatcher(deps), batcher)
    pb_grpc.add_RewardServiceServicer_to_server(servicer, server)
