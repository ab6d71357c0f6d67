"""Audit: do the Prometheus metrics tell operators the truth? (docs/operations.md, "Metrics").

Checked against the database and the answers callers got, on the pinned clock (docs lines):

- operations.md:113 `promo_rewards_total` and :147 (Denials): "GetReward answers: `granted`,
  `existing` (a retry, or the customer's earlier grant), `denied` with the reason": 600
  concurrent calls over two servers against a customer cap and a budget cap, their retries and
  new request ids for the granted customers: counter deltas equal the answers exactly.
- :111-112 `promo_rpc_handled_total` / `promo_rpc_duration_seconds` ("RPCs finished, by status
  ... Health checks and reflection are not counted"; "From the call's start (authentication
  included) to its status") and :137-143 (Errors: INVALID_ARGUMENT, NOT_FOUND, UNAUTHENTICATED,
  PERMISSION_DENIED, UNAVAILABLE with DATABASE_UNAVAILABLE): each failure counted once with its
  code, a client's cancel as CANCELLED, a deadline as DEADLINE_EXCEEDED, the histogram observed
  once per call, nothing else moved.
- :124-126 `promo_cap_used` / `promo_cap_limit` ("each cap of an ACTIVE promotion (at most 500,
  by code) ... in the promotion's time zone, so a daily cap reads 0 from local midnight until
  the day's first grant") and `promo_code_pool_*` ("each active PERSONALIZED promotion's
  codes"): equal to the live grants, GetPromotion and GetCodeInventory after grants, a revoke,
  an UpdatePromotion recount, a rollover at New York midnight, uploads and a deactivation.
- :116 and :151 `promo_webhook_deliveries_total` ("Per attempt: delivered, retry, failed,
  dead ...; and `cancelled` / `dead` for deliveries closed without an attempt") against the
  delivery log, after a run against real listeners answering 200, 500 and 400, one hanging
  past the timeout, one deactivated and one unregistered mid-way.
- :120-123 and :154 `promo_outbox_*` ("Outbox jobs not finished", "Of those, due now", "How
  long the oldest due job has waited", "Jobs out of attempts") against `outbox_jobs`.
- Bonus batches: the docs list no bonus metric and none exists.
- Label cardinality: no label value comes from caller input (unknown methods, promotion codes
  in GetReward calls); the per-promotion gauges stop at MAX_PROMOTIONS, by code.

Defects (xfail strict): deliveries cancelled by UnregisterListener are never counted; a request
that fails to deserialize is never counted; a promotion edited away from PERSONALIZED keeps its
code-pool series. Not reproducible on demand (noted in the RPC test, tolerated there): a call
whose client deadline ran out is sometimes counted CANCELLED instead of DEADLINE_EXCEEDED.

The counters live in prometheus_client's process-wide registry (one per xdist worker): tests
measure deltas. The scrape-time gauges are read through a registry of the test's own.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from core.clock import FixedClock
from core.events import EventType
from promo.v1 import codes_pb2 as cpb
from promo.v1 import codes_pb2_grpc as cpb_grpc
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc
from server import metrics as server_metrics
from server import promotion_metrics
from server.app import Dependencies, start_server
from server.promotion_metrics import PromotionsCollector
from storage import webhooks as repo
from tests.conftest import ADMIN_KEY, Api, rpc_error_reason
from tests.e2e.code_helpers import code_promotion, codes_file, upload
from tests.e2e.promo_helpers import cap, get_reward, promotion, revoke, reward_type
from tests.webhook_listener import SECRET, WebhookListener
from workers import main as _main  # noqa: F401  (registers every outbox handler)
from workers import metrics as worker_metrics
from workers import webhooks
from workers.metrics import OutboxCollector
from workers.outbox import run_outbox_job

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
REWARD_SERVICE = "promo.v1.RewardService"
PROMOTION_SERVICE = "promo.v1.PromotionService"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _snapshot(*metrics: Any) -> Samples:
    """The samples of in-process metrics (no _created timestamps)."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for metric in metrics for family in metric.collect() for s in family.samples
            if not s.name.endswith("_created")}


def _delta(before: Samples, after: Samples, *, names: Iterable[str] | None = None) -> Samples:
    wanted = set(names) if names is not None else None
    found: Samples = {}
    for key, value in after.items():
        if wanted is not None and key[0] not in wanted:
            continue
        moved = value - before.get(key, 0.0)
        if moved:
            found[key] = moved
    return found


def _key(name: str, **labels: str) -> tuple[str, frozenset[tuple[str, str]]]:
    return name, frozenset(labels.items())


async def _scrape(registry: CollectorRegistry) -> Samples:
    """The text a Prometheus scrape gets, produced in another thread as the HTTP server does."""
    text = (await asyncio.to_thread(generate_latest, registry)).decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _series(samples: Samples, name: str) -> dict[frozenset[tuple[str, str]], float]:
    return {labels: value for (n, labels), value in samples.items() if n == name}


@pytest.fixture
async def promo_registry(pool: asyncpg.Pool, clock: FixedClock) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(PromotionsCollector(asyncio.get_running_loop(), lambda: pool, clock))
    return registry


@pytest.fixture
async def outbox_registry(pool: asyncpg.Pool) -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(OutboxCollector(asyncio.get_running_loop(), lambda: pool))
    return registry


# ---------------------------------------------------------------------------------------------
# 1. GetReward outcomes: exact under concurrency, retries as documented
# ---------------------------------------------------------------------------------------------

def _outcome(response: rpb.GetRewardResponse) -> tuple[str, str]:
    if response.HasField("grant"):
        return ("existing" if response.existing else "granted"), ""
    return "denied", rpb.DenialReason.Name(response.denial_reason).removeprefix("DENIAL_REASON_")


async def test_reward_counters_add_up_to_the_answers_under_concurrency(
        api: Api, second_server: Api, pool: asyncpg.Pool) -> None:
    await reward_type(api)
    await promotion(api, "CUSTCAP", customer_cap=100)
    await promotion(api, "BUDGET", caps=[cap(ppb.CAP_PERIOD_DAILY, "1500")])  # 100 grants of 15
    stubs = [rpb_grpc.RewardServiceStub(api.channel),
             rpb_grpc.RewardServiceStub(second_server.channel)]
    before = _snapshot(server_metrics.REWARDS)

    async def call(code: str, customer: str, request_id: str, i: int) -> tuple[str, str]:
        return _outcome(await get_reward(api, customer, code, request_id=request_id,
                                         stub=stubs[i % 2]))

    calls = [(code, f"{code}-c{i}", f"{code}-r{i}", i) for code in ("CUSTCAP", "BUDGET")
             for i in range(300)]
    first = await asyncio.gather(*(call(*c) for c in calls))
    answered = Counter(first)
    assert answered == {("granted", ""): 200, ("denied", "CUSTOMER_CAP_REACHED"): 200,
                        ("denied", "BUDGET_CAP_REACHED"): 200}
    # The same requests again (retries), and the granted customers under new request ids.
    granted = [c for c, o in zip(calls, first, strict=True) if o[0] == "granted"]
    again = await asyncio.gather(*(call(*c) for c in calls),
                                 *(call(code, customer, uuid.uuid4().hex, i)
                                   for code, customer, _, i in granted))
    assert Counter(o for o in again[600:]) == {("existing", ""): 200}
    assert Counter(o for o, c in zip(again[:600], calls, strict=True)
                   if c in granted) == {("existing", ""): 200}
    answered.update(again)

    moved = _delta(before, _snapshot(server_metrics.REWARDS))
    assert moved == {_key("promo_rewards_total", outcome=o, reason=r): float(n)
                     for (o, r), n in answered.items()}
    # And the database holds exactly the grants counted as granted.
    assert await pool.fetchval("SELECT count(*) FROM grants") == answered[("granted", "")]


# ---------------------------------------------------------------------------------------------
# 2. RPCs by method and code, latency once per call
# ---------------------------------------------------------------------------------------------

async def _until(check: Any, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.02)


async def _waiting_on_lock(pool: asyncpg.Pool) -> bool:
    return bool(await pool.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
        "AND datname = current_database()"))


async def test_rpc_failures_are_counted_once_with_their_code_and_latency(
        api: Api, pool: asyncpg.Pool) -> None:
    await reward_type(api)
    await promotion(api)
    rewards = rpb_grpc.RewardServiceStub(api.channel)
    promotions = ppb_grpc.PromotionServiceStub(api.channel)
    metrics = (server_metrics.RPC_HANDLED, server_metrics.RPC_SECONDS)
    before = _snapshot(*metrics)
    seen: Counter[tuple[str, str, str]] = Counter()

    async def expect(service: str, method: str, code: grpc.StatusCode, call: Any) -> None:
        try:
            await call
            got = grpc.StatusCode.OK
        except grpc.RpcError as exc:
            got = exc.code()
        assert got is code, (method, got)
        seen[(service, method, code.name)] += 1

    def reward(customer: str, code: str = "VIP25", key: str = "runtime", **kw: Any) -> Any:
        return rewards.GetReward(rpb.GetRewardRequest(
            promotion_code=code, customer_id=customer, request_id=uuid.uuid4().hex),
            metadata=api.key(key), **kw)

    await expect(REWARD_SERVICE, "GetReward", grpc.StatusCode.OK, reward("c1"))
    await expect(REWARD_SERVICE, "GetReward", grpc.StatusCode.INVALID_ARGUMENT, reward(""))
    await expect(REWARD_SERVICE, "GetReward", grpc.StatusCode.INVALID_ARGUMENT, reward(""))
    await expect(REWARD_SERVICE, "GetReward", grpc.StatusCode.NOT_FOUND, reward("c1", "NOPE"))
    await expect(REWARD_SERVICE, "GetReward", grpc.StatusCode.PERMISSION_DENIED,
                 reward("c1", key="listener"))
    await expect(PROMOTION_SERVICE, "GetPromotion", grpc.StatusCode.UNAUTHENTICATED,
                 promotions.GetPromotion(ppb.GetPromotionRequest(promotion_code="VIP25")))
    await expect(PROMOTION_SERVICE, "GetPromotion", grpc.StatusCode.UNAUTHENTICATED,
                 promotions.GetPromotion(ppb.GetPromotionRequest(promotion_code="VIP25"),
                                         metadata=(("x-api-key", "wrong-key-0123456789"),)))
    await expect(PROMOTION_SERVICE, "CreatePromotion", grpc.StatusCode.PERMISSION_DENIED,
                 promotions.CreatePromotion(ppb.CreatePromotionRequest(request_id="x"),
                                            metadata=api.key("runtime")))
    # A client-streaming call refused with a domain error (not a PERSONALIZED promotion).
    with pytest.raises(grpc.RpcError) as refused:
        await upload(api, "VIP25", codes_file("X", 3), "u-bad")
    seen[("promo.v1.CodePoolService", "UploadCodes", refused.value.code().name)] += 1
    assert refused.value.code() in (grpc.StatusCode.FAILED_PRECONDITION,
                                    grpc.StatusCode.INVALID_ARGUMENT)

    # A GetReward held up by a lock on the grants table: its deadline runs out, then a second
    # one is cancelled by its client. Each is counted when the server's handler stops.
    async with pool.acquire() as blocker:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("LOCK TABLE grants IN EXCLUSIVE MODE")
        try:
            handled = server_metrics.RPC_HANDLED
            deadline = handled.labels(REWARD_SERVICE, "GetReward", "DEADLINE_EXCEEDED")
            cancelled = handled.labels(REWARD_SERVICE, "GetReward", "CANCELLED")
            base_deadline, base_cancelled = deadline._value.get(), cancelled._value.get()
            await expect(REWARD_SERVICE, "GetReward", grpc.StatusCode.DEADLINE_EXCEEDED,
                         reward("c2", timeout=1.0))
            await _until(lambda: deadline._value.get() + cancelled._value.get()
                         > base_deadline + base_cancelled)
            if cancelled._value.get() > base_cancelled:
                # DEFECT (not reproducible on demand, so no strict xfail; about 1 call in 6
                # here, up to 9 of 40 concurrent ones): the client's deadline ran out, yet the
                # server still had time_remaining() > 0 and counted it CANCELLED
                # (server/interceptors.py, _cancelled). Counted once all the same.
                seen[(REWARD_SERVICE, "GetReward", "DEADLINE_EXCEEDED")] -= 1
                seen[(REWARD_SERVICE, "GetReward", "CANCELLED")] += 1
                base_cancelled = cancelled._value.get()
            call = reward("c3")
            for _ in range(500):
                if await _waiting_on_lock(pool):
                    break
                await asyncio.sleep(0.01)
            call.cancel()
            with pytest.raises(asyncio.CancelledError):
                await call
            seen[(REWARD_SERVICE, "GetReward", "CANCELLED")] += 1
            await _until(lambda: cancelled._value.get() > base_cancelled)
        finally:
            await tx.rollback()
    # Health checks are not counted; nor is a method the server does not have.
    await health_pb2_grpc.HealthStub(api.channel).Check(health_pb2.HealthCheckRequest())
    unknown = api.channel.unary_unary(f"/{REWARD_SERVICE}/NoSuchMethod",
                                      request_serializer=lambda b: b,
                                      response_deserializer=lambda b: b)
    with pytest.raises(grpc.RpcError) as missing:
        await unknown(b"", metadata=api.key())
    assert missing.value.code() is grpc.StatusCode.UNIMPLEMENTED

    moved = _delta(before, _snapshot(*metrics),
                   names=("promo_rpc_handled_total", "promo_rpc_duration_seconds_count"))
    expected: Samples = {}
    for (service, method, code), n in (+seen).items():
        labels = dict(grpc_service=service, grpc_method=method, grpc_code=code)
        expected[_key("promo_rpc_handled_total", **labels)] = float(n)
        expected[_key("promo_rpc_duration_seconds_count", **labels)] = float(n)
    assert moved == expected
    # The deadline's call is observed with (at least) the time it waited.
    after = _snapshot(*metrics)
    waited = sum(after[k] - before.get(k, 0.0) for k in after
                 if k[0] == "promo_rpc_duration_seconds_sum"
                 and ("grpc_method", "GetReward") in k[1]
                 and dict(k[1])["grpc_code"] in ("DEADLINE_EXCEEDED", "CANCELLED"))
    assert waited >= 0.9


async def test_database_unavailable_is_counted_as_unavailable(settings: Settings) -> None:
    dead = await asyncpg.create_pool("postgresql://postgres@127.0.0.1:1/none", min_size=0,
                                     max_size=2)
    running = await start_server(settings, Dependencies(pool=dead, clock=FixedClock(
        datetime(2026, 11, 22, 10, 0, tzinfo=UTC))))
    channel = aio.insecure_channel(running.address)
    try:
        labels = dict(grpc_service=REWARD_SERVICE, grpc_method="GetReward")
        before = _snapshot(server_metrics.RPC_HANDLED, server_metrics.RPC_SECONDS)
        for _ in range(2):
            with pytest.raises(grpc.RpcError) as failed:
                await rpb_grpc.RewardServiceStub(channel).GetReward(rpb.GetRewardRequest(
                    promotion_code="VIP25", customer_id="c1", request_id=uuid.uuid4().hex),
                    metadata=Api.key("runtime"))
            assert failed.value.code() is grpc.StatusCode.UNAVAILABLE
            assert rpc_error_reason(failed.value) == "DATABASE_UNAVAILABLE"
        moved = _delta(before, _snapshot(server_metrics.RPC_HANDLED, server_metrics.RPC_SECONDS),
                       names=("promo_rpc_handled_total", "promo_rpc_duration_seconds_count"))
        assert moved == {_key("promo_rpc_handled_total", **labels, grpc_code="UNAVAILABLE"): 2.0,
                         _key("promo_rpc_duration_seconds_count", **labels,
                              grpc_code="UNAVAILABLE"): 2.0}
    finally:
        await channel.close()
        await running.stop(0)
        await dead.close()


async def test_undecodable_request_is_counted(api: Api) -> None:
    raw = api.channel.unary_unary(f"/{REWARD_SERVICE}/GetReward",
                                  request_serializer=lambda b: b,
                                  response_deserializer=lambda b: b)
    before = _snapshot(server_metrics.RPC_HANDLED)
    with pytest.raises(grpc.RpcError) as failed:
        await raw(b"\xff\xff\xff\xff", metadata=Api.key("runtime"))
    code = failed.value.code()
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(failed.value) == "INVALID_REQUEST"
    assert "not a valid GetReward request message" in (failed.value.details() or "")
    # "RPCs finished, by status": the call finished with a status the caller saw.
    assert _delta(before, _snapshot(server_metrics.RPC_HANDLED)) == {
        _key("promo_rpc_handled_total", grpc_service=REWARD_SERVICE, grpc_method="GetReward",
             grpc_code=code.name): 1.0}


# ---------------------------------------------------------------------------------------------
# 3. Cap usage and code inventory gauges against the database
# ---------------------------------------------------------------------------------------------

async def _truth(pool: asyncpg.Pool, api: Api, code: str) -> dict[tuple[str, str], float]:
    """(scope, period) -> use in the current window, from GetPromotion, checked against the
    live grants themselves (budget caps: values of GRANTED grants inside the window; customer
    cap: customers holding a live grant)."""
    shown = (await ppb_grpc.PromotionServiceStub(api.channel).GetPromotion(
        ppb.GetPromotionRequest(promotion_code=code), metadata=api.key())).promotion
    found: dict[tuple[str, str], float] = {}
    for usage in shown.cap_usage:
        period = ppb.CapPeriod.Name(usage.period).removeprefix("CAP_PERIOD_")
        if usage.scope == "#customers":
            live = await pool.fetchval(
                """SELECT count(*) FROM promotion_customers pc JOIN promotions p
                     ON p.id = pc.promotion_id WHERE p.code = $1 AND pc.live_grants > 0""", code)
        else:
            start = usage.period_start.ToDatetime(tzinfo=UTC)
            live = await pool.fetchval(
                """SELECT coalesce(sum((r->>'value')::numeric), 0)
                     FROM grants g JOIN promotions p ON p.id = g.promotion_id,
                          jsonb_array_elements(g.rewards) AS r
                    WHERE p.code = $1 AND g.status = 'GRANTED' AND g.granted_at >= $2
                      AND r->>'reward_type' = $3""", code, start, usage.scope)
        assert Decimal(usage.used) == Decimal(live), (usage, live)
        found[(usage.scope, period)] = float(live)
    return found


def _gauge(samples: Samples, name: str, code: str) -> dict[tuple[str, str], float]:
    return {(dict(labels)["scope"], dict(labels)["period"]): value
            for labels, value in _series(samples, name).items()
            if dict(labels)["promotion"] == code}


async def test_cap_gauges_follow_grants_revokes_edits_and_local_midnight(
        api: Api, pool: asyncpg.Pool, clock: FixedClock,
        promo_registry: CollectorRegistry) -> None:
    await reward_type(api)
    # Pinned: Sunday 2026-11-22 10:00 UTC, 05:00 in New York.
    await promotion(api, "NYC", customer_cap=10, time_zone="America/New_York", caps=[
        cap(ppb.CAP_PERIOD_DAILY, "100"), cap(ppb.CAP_PERIOD_WEEKLY, "1000")])
    await promotion(api, "DRAFTED", activate=False, caps=[cap(ppb.CAP_PERIOD_DAILY, "5")])
    grants = {c: (await get_reward(api, c, "NYC")).grant.grant_id for c in ("a", "b", "c")}

    async def check(expected: dict[tuple[str, str], float]) -> None:
        samples = await _scrape(promo_registry)
        assert _gauge(samples, "promo_cap_used", "NYC") == expected == await _truth(
            pool, api, "NYC")

    await check({("#customers", "LIFETIME"): 3, ("cashback", "DAILY"): 45,
                 ("cashback", "WEEKLY"): 45})
    samples = await _scrape(promo_registry)
    assert _gauge(samples, "promo_cap_limit", "NYC") == {
        ("#customers", "LIFETIME"): 10, ("cashback", "DAILY"): 100, ("cashback", "WEEKLY"): 1000}
    assert not _gauge(samples, "promo_cap_used", "DRAFTED")  # only ACTIVE promotions

    await revoke(api, grants["b"])
    await check({("#customers", "LIFETIME"): 2, ("cashback", "DAILY"): 30,
                 ("cashback", "WEEKLY"): 30})

    # Deactivated (editing needs it): its series go, as documented (ACTIVE promotions only).
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    await stub.DeactivatePromotion(ppb.DeactivatePromotionRequest(
        request_id="off", promotion_code="NYC"), metadata=api.key())
    assert not _gauge(await _scrape(promo_registry), "promo_cap_used", "NYC")
    # An edit adding a monthly cap, recounted from the live grants; back on reactivation.
    await stub.UpdatePromotion(ppb.UpdatePromotionRequest(
        request_id="edit-caps", promotion=ppb.Promotion(promotion_code="NYC", budget_caps=[
            cap(ppb.CAP_PERIOD_DAILY, "100"), cap(ppb.CAP_PERIOD_WEEKLY, "1000"),
            cap(ppb.CAP_PERIOD_MONTHLY, "5000")]),
        update_mask=field_mask_pb2.FieldMask(paths=["budget_caps"])), metadata=api.key())
    await stub.ActivatePromotion(ppb.ActivatePromotionRequest(
        request_id="on", promotion_code="NYC"), metadata=api.key())
    await check({("#customers", "LIFETIME"): 2, ("cashback", "DAILY"): 30,
                 ("cashback", "WEEKLY"): 30, ("cashback", "MONTHLY"): 30})

    # 03:00 UTC Monday is still Sunday evening in New York: nothing rolls over.
    clock.set(datetime(2026, 11, 23, 3, 0, tzinfo=UTC))
    await check({("#customers", "LIFETIME"): 2, ("cashback", "DAILY"): 30,
                 ("cashback", "WEEKLY"): 30, ("cashback", "MONTHLY"): 30})
    # 06:00 UTC is past local midnight (and the ISO week's start): daily and weekly read 0.
    clock.set(datetime(2026, 11, 23, 6, 0, tzinfo=UTC))
    await check({("#customers", "LIFETIME"): 2, ("cashback", "DAILY"): 0,
                 ("cashback", "WEEKLY"): 0, ("cashback", "MONTHLY"): 30})
    await get_reward(api, "d", "NYC")
    await check({("#customers", "LIFETIME"): 3, ("cashback", "DAILY"): 15,
                 ("cashback", "WEEKLY"): 15, ("cashback", "MONTHLY"): 45})


async def test_code_pool_gauges_follow_uploads_grants_and_fallbacks(
        api: Api, pool: asyncpg.Pool, promo_registry: CollectorRegistry) -> None:
    await code_promotion(api, "FLASH", fallback="FB-SHARED")
    codes = cpb_grpc.CodePoolServiceStub(api.channel)

    async def check() -> tuple[float, float, float]:
        samples = await _scrape(promo_registry)
        gauges = tuple(_series(samples, name).get(frozenset({("promotion", "FLASH")}))
                       for name in ("promo_code_pool_available", "promo_code_pool_used",
                                    "promo_code_pool_fallback_grants"))
        inventory = (await codes.GetCodeInventory(cpb.GetCodeInventoryRequest(
            promotion_code="FLASH"), metadata=api.key())).inventory
        rows = await pool.fetchval(
            "SELECT count(*) FROM promo_codes c JOIN promotions p ON p.id = c.promotion_id "
            "WHERE p.code = 'FLASH'")
        handed = await pool.fetchval(
            "SELECT count(*) FROM grants g JOIN promotions p ON p.id = g.promotion_id "
            "WHERE p.code = 'FLASH' AND g.promo_code NOT IN ('', 'FB-SHARED')")
        fallback = await pool.fetchval(
            "SELECT count(*) FROM grants g JOIN promotions p ON p.id = g.promotion_id "
            "WHERE p.code = 'FLASH' AND g.promo_code = 'FB-SHARED'")
        truth = (float(rows - handed), float(handed), float(fallback))
        assert gauges == truth == (float(inventory.available), float(inventory.used),
                                   float(inventory.fallback_grants))
        return truth

    await upload(api, "FLASH", codes_file("FL", 3), "u1")
    assert await check() == (3, 0, 0)
    for customer in ("a", "b", "c", "d"):
        await get_reward(api, customer, "FLASH")
    assert await check() == (0, 3, 1)
    await upload(api, "FLASH", codes_file("FL", 2, start=4), "u2")
    assert await check() == (2, 3, 1)
    await get_reward(api, "e", "FLASH")
    assert await check() == (1, 4, 1)


async def test_code_pool_gauges_only_for_personalized_promotions(
        api: Api, promo_registry: CollectorRegistry) -> None:
    await code_promotion(api, "WAS-PERSONAL", fallback="FB")
    await upload(api, "WAS-PERSONAL", codes_file("W", 2), "u1")
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    await stub.DeactivatePromotion(ppb.DeactivatePromotionRequest(
        request_id="off", promotion_code="WAS-PERSONAL"), metadata=api.key())
    await stub.UpdatePromotion(ppb.UpdatePromotionRequest(
        request_id="edit", promotion=ppb.Promotion(
            promotion_code="WAS-PERSONAL", code_type=ppb.CODE_TYPE_PROMOTION_CODE,
            fallback_code=""),
        update_mask=field_mask_pb2.FieldMask(paths=["code_type", "fallback_code"])),
        metadata=api.key())
    await stub.ActivatePromotion(ppb.ActivatePromotionRequest(
        request_id="on", promotion_code="WAS-PERSONAL"), metadata=api.key())
    with pytest.raises(grpc.RpcError) as refused:
        await cpb_grpc.CodePoolServiceStub(api.channel).GetCodeInventory(
            cpb.GetCodeInventoryRequest(promotion_code="WAS-PERSONAL"), metadata=api.key())
    assert rpc_error_reason(refused.value) == "NOT_PERSONALIZED"
    # Docs: "each active PERSONALIZED promotion's codes": this one has no pool to watch.
    samples = await _scrape(promo_registry)
    assert not [key for key in samples if ("promotion", "WAS-PERSONAL") in key[1]
                and key[0].startswith("promo_code_pool_")]


async def test_per_promotion_series_stop_at_max_promotions_by_code(
        api: Api, promo_registry: CollectorRegistry, monkeypatch: pytest.MonkeyPatch) -> None:
    """Label cardinality: promotion codes are labels, bounded by MAX_PROMOTIONS (500, by code);
    shrunk here to 3 to show the bound without 501 promotions."""
    await reward_type(api)
    for code in ("P4", "P2", "P3", "P1"):
        await promotion(api, code, customer_cap=5)
    monkeypatch.setattr(promotion_metrics, "MAX_PROMOTIONS", 3)
    samples = await _scrape(promo_registry)
    assert sorted(dict(labels)["promotion"] for labels in
                  _series(samples, "promo_cap_limit")) == ["P1", "P2", "P3"]


# ---------------------------------------------------------------------------------------------
# 4. Webhook delivery outcomes against the delivery log
# ---------------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def _worker_ctx(settings: Settings, pool: asyncpg.Pool,
                      clock: FixedClock) -> AsyncIterator[dict[str, Any]]:
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "redis": None, "settings":
                           settings.model_copy(update={"webhook_timeout_seconds": 1.0,
                                                       "webhook_max_attempts": 2})}
    await webhooks.setup(ctx)
    try:
        yield ctx
    finally:
        await webhooks.teardown(ctx)


async def _register(api: Api, url: str, name: str) -> int:
    response = await lpb_grpc.ListenerServiceStub(api.channel).RegisterListener(
        lpb.RegisterListenerRequest(request_id=f"reg-{name}", listener=lpb.Listener(
            event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN, url=url, secret=SECRET,
            description=name)), metadata=api.key())
    return response.listener.listener_id


_FINAL = {"DELIVERED": "delivered", "FAILED": "failed", "DEAD": "dead", "PENDING": "retry",
          "CANCELLED": "cancelled"}


async def _delivery_log(pool: asyncpg.Pool) -> Counter[str]:
    """Per the delivery log, what each attempt and each attempt-less closing was: every
    attempt but a delivery's last is a retry; the last one (or a closing with no attempt) is
    the delivery's status."""
    found: Counter[str] = Counter()
    for row in await pool.fetch(
            """SELECT d.status, count(a.id) AS attempts FROM webhook_deliveries d
                 LEFT JOIN webhook_attempts a ON a.delivery_id = d.id GROUP BY d.id, d.status"""):
        if row["attempts"]:
            found["retry"] += row["attempts"] - 1
        if row["attempts"] or row["status"] in ("CANCELLED", "DEAD"):
            found[_FINAL[row["status"]]] += 1
    return found


async def _run_deliveries(ctx: dict[str, Any], pool: asyncpg.Pool, clock: FixedClock) -> None:
    """Run the due delivery jobs on the pinned clock until none is pending."""
    for _ in range(10):
        row = await pool.fetchrow(
            """SELECT id, due_at FROM outbox_jobs WHERE kind = $1 AND status = 'pending'
                ORDER BY due_at, id LIMIT 1""", repo.DELIVER_KIND)
        if row is None:
            return
        clock.set(max(clock.now(), row["due_at"]))
        await run_outbox_job(ctx, row["id"])
    raise AssertionError("deliveries still pending")


async def _webhook_run(api: Api, settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
                       *, unregister: bool) -> tuple[Samples, Counter[str]]:
    def now() -> int:
        return int(clock.now().timestamp())

    ok = await WebhookListener(now=now).start()
    broken = await WebhookListener(now=now, default=500).start()
    refusing = await WebhookListener(now=now, default=400).start()
    slow = await WebhookListener(now=now).start()
    slow.answer("hang")  # first attempt outlives the 1 s timeout, the second gets 200
    off = await WebhookListener(now=now).start()
    gone = await WebhookListener(now=now).start()
    listeners = [ok, broken, refusing, slow, off, gone]
    try:
        ids = {name: await _register(api, listener.url, name) for name, listener in
               zip(("ok", "broken", "refusing", "slow", "off", "gone"), listeners, strict=True)}
        async with pool.acquire() as conn, conn.transaction():
            await repo.emit_event(conn, event_type=EventType.SCHEDULED_CAMPAIGN,
                                  now=clock.now(), payload={"campaign_id": "audit"})
        stub = lpb_grpc.ListenerServiceStub(api.channel)
        await stub.UpdateListener(lpb.UpdateListenerRequest(
            request_id="off", listener=lpb.Listener(listener_id=ids["off"], active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["active"])), metadata=api.key())
        if unregister:
            await stub.UnregisterListener(lpb.UnregisterListenerRequest(
                request_id="gone", listener_id=ids["gone"]), metadata=api.key())
        before = _snapshot(worker_metrics.DELIVERIES, worker_metrics.ATTEMPT_SECONDS)
        async with _worker_ctx(settings, pool, clock) as ctx:
            await _run_deliveries(ctx, pool, clock)
        moved = _delta(before, _snapshot(worker_metrics.DELIVERIES,
                                         worker_metrics.ATTEMPT_SECONDS))
        return moved, await _delivery_log(pool)
    finally:
        for listener in listeners:
            await listener.stop()


def _by_outcome(moved: Samples) -> Counter[str]:
    return Counter({dict(labels)["outcome"]: int(value) for (name, labels), value in moved.items()
                    if name == "promo_webhook_deliveries_total"})


async def test_delivery_outcome_counters_match_the_delivery_log(
        api: Api, settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    moved, log = await _webhook_run(api, settings, pool, clock, unregister=False)
    # ok: delivered; broken: retry then dead (2 attempts); refusing: failed; slow: retry then
    # delivered; off (deactivated): cancelled without an attempt; gone (still registered):
    # delivered.
    assert log == {"delivered": 3, "retry": 2, "dead": 1, "failed": 1, "cancelled": 1}
    assert _by_outcome(moved) == log
    attempts = await pool.fetchval("SELECT count(*) FROM webhook_attempts")
    assert moved[_key("promo_webhook_attempt_duration_seconds_count", channel="webhook")] \
        == attempts == 7
    assert all(dict(labels)["channel"] == "webhook" for _, labels in moved)


async def test_deliveries_cancelled_by_unregistering_are_counted(
        api: Api, settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    moved, log = await _webhook_run(api, settings, pool, clock, unregister=True)
    # The delivery log: gone's delivery CANCELLED without an attempt, as off's.
    assert log == {"delivered": 2, "retry": 2, "dead": 1, "failed": 1, "cancelled": 2}
    assert _by_outcome(moved) == log


# ---------------------------------------------------------------------------------------------
# 5. Outbox backlog gauges against outbox_jobs
# ---------------------------------------------------------------------------------------------

async def test_outbox_gauges_equal_the_outbox_table(
        pool: asyncpg.Pool, outbox_registry: CollectorRegistry) -> None:
    # Due times relative to PostgreSQL's now(), which the gauges (and due_at's default) use.
    await pool.execute(
        """INSERT INTO outbox_jobs (kind, payload, status, due_at, attempts, locked_until)
           SELECT kind, '{}'::jsonb, status, now() + due::interval, attempts,
                  CASE WHEN leased THEN now() + interval '5 minutes' END
             FROM (VALUES
               ('audit.a', 'pending', '-2 hours', 0, false),
               ('audit.a', 'pending', '-10 minutes', 3, true),   -- in flight: still due
               ('audit.a', 'pending', '+1 hour', 0, false),      -- scheduled later
               ('audit.a', 'dead', '-3 days', 8, false),
               ('audit.a', 'done', '-1 day', 1, false),
               ('audit.b', 'pending', '+20 minutes', 0, false),
               ('audit.c', 'dead', '-1 hour', 8, false),
               ('audit.c', 'dead', '-2 hours', 8, false),
               ('audit.d', 'done', '-1 hour', 1, false)
             ) AS j(kind, status, due, attempts, leased)""")
    truth = {row["kind"]: row for row in await pool.fetch(
        """SELECT kind, count(*) FILTER (WHERE status = 'pending') AS pending,
                  count(*) FILTER (WHERE status = 'pending' AND due_at <= now()) AS due,
                  extract(epoch FROM now() - min(due_at) FILTER (
                      WHERE status = 'pending' AND due_at <= now())) AS oldest,
                  count(*) FILTER (WHERE status = 'dead') AS dead
             FROM outbox_jobs GROUP BY kind""")}
    samples = await _scrape(outbox_registry)

    def gauge(name: str) -> dict[str, float]:
        return {dict(labels)["kind"]: value for labels, value in _series(samples, name).items()}

    assert gauge("promo_outbox_pending_jobs") == {k: float(r["pending"]) for k, r in
                                                  truth.items() if r["pending"]} \
        == {"audit.a": 3, "audit.b": 1}
    assert gauge("promo_outbox_due_jobs") == {k: float(r["due"]) for k, r in truth.items()
                                              if r["pending"]} == {"audit.a": 2, "audit.b": 0}
    assert gauge("promo_outbox_dead_jobs") == {k: float(r["dead"]) for k, r in truth.items()
                                               if r["dead"]} == {"audit.a": 1, "audit.c": 2}
    oldest = gauge("promo_outbox_oldest_due_age_seconds")
    assert set(oldest) == {"audit.a", "audit.b"} and oldest["audit.b"] == 0
    # Two hours, read a moment apart from the truth query.
    assert 7200 <= float(truth["audit.a"]["oldest"]) <= oldest["audit.a"] < 7200 + 60


# ---------------------------------------------------------------------------------------------
# 6 and 7. No bonus metrics promised; no label values from caller input
# ---------------------------------------------------------------------------------------------

def test_no_bonus_batch_metrics_exist_or_are_documented() -> None:
    from pathlib import Path

    from prometheus_client import REGISTRY

    docs = (Path(__file__).resolve().parents[2] / "docs" / "operations.md").read_text()
    assert "promo_bonus" not in docs
    names = {name for name in REGISTRY._names_to_collectors}
    assert not [n for n in names if n.startswith("promo_bonus")]


async def test_caller_input_never_becomes_a_label_value(api: Api) -> None:
    await reward_type(api)
    await promotion(api)
    metrics = (server_metrics.RPC_HANDLED, server_metrics.RPC_SECONDS, server_metrics.REWARDS)
    before = _snapshot(*metrics)
    rewards = rpb_grpc.RewardServiceStub(api.channel)
    for i in range(50):
        # Unknown promotion codes: NOT_FOUND under the method's own labels.
        with pytest.raises(grpc.RpcError):
            await rewards.GetReward(rpb.GetRewardRequest(
                promotion_code=f"RANDOM-{i}", customer_id="c", request_id=uuid.uuid4().hex),
                metadata=Api.key("runtime"))
        # Invented method names, known and unknown services: never counted.
        for path in (f"/{REWARD_SERVICE}/Made{i}", f"/made.up.Service{i}/Call"):
            with pytest.raises(grpc.RpcError):
                await api.channel.unary_unary(path, request_serializer=lambda b: b,
                                              response_deserializer=lambda b: b)(
                    b"", metadata=(("x-api-key", ADMIN_KEY),))
    moved = _delta(before, _snapshot(*metrics))
    labels = {labels for _, labels in moved}
    assert {dict(x).get("grpc_method") for x in labels} == {"GetReward"}
    assert {dict(x).get("grpc_code") for x in labels} == {"NOT_FOUND"}
    assert moved[_key("promo_rpc_handled_total", grpc_service=REWARD_SERVICE,
                      grpc_method="GetReward", grpc_code="NOT_FOUND")] == 50
    assert not any(name == "promo_rewards_total" for name, _ in moved)

