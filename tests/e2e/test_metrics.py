"""Prometheus endpoints of real processes, scraped over HTTP: a `promo serve` subprocess (RPC
counts and latencies by method and code, GetReward grants and denials by reason) and a
`promo worker` subprocess (webhook delivery outcomes, batch durations, the outbox queue)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import grpc
import httpx
import pytest
from grpc import aio
from prometheus_client.parser import text_string_to_metric_families

from config.settings import Settings
from core.clock import SystemClock
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from server.app import Dependencies, start_server
from tests.conftest import ADMIN_KEY, RUNTIME_KEY, Api
from tests.e2e.campaign_helpers import create_campaign
from tests.e2e.code_helpers import code_promotion, codes_file, upload
from tests.e2e.promo_helpers import get_reward, promotion, reward_type
from tests.webhook_listener import SECRET, WebhookListener, free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    env.update(PROMO_DATABASE_URL=settings.database_url or "",
               PROMO_REDIS_URL=settings.redis_url or "", PROMO_QUEUE_NAME=settings.queue_name,
               PROMO_LOG_LEVEL="WARNING", PROMO_MIGRATE_ON_START="false",
               PROMO_API_KEYS=json.dumps([
                   {"name": "admin", "key": ADMIN_KEY, "roles": ["admin"]},
                   {"name": "runtime", "key": RUNTIME_KEY, "roles": ["runtime"]}]), **extra)
    return env


async def _scrape(port: int) -> Samples:
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
    assert response.status_code == 200
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(response.text)
            for s in family.samples}


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def _until_scraped(port: int, proc: asyncio.subprocess.Process) -> None:
    for _ in range(300):
        if proc.returncode is not None:
            raise AssertionError(f"the process exited with {proc.returncode}")
        try:
            await _scrape(port)
            return
        except httpx.TransportError:
            await asyncio.sleep(0.1)
    raise AssertionError("the metrics endpoint did not come up")


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[tuple[Api, int]]:
    """`promo serve` with PROMO_METRICS_PORT: its gRPC address and its metrics port."""
    port, metrics_port = free_port(), free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "serve",
        env=_env(settings, PROMO_GRPC_PORT=str(port), PROMO_METRICS_PORT=str(metrics_port)),
        cwd=PROJECT_ROOT)
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        await _until_scraped(metrics_port, proc)
        yield Api(channel=channel, address=f"127.0.0.1:{port}"), metrics_port
    finally:
        await channel.close()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=30)


async def test_server_counts_rpcs_by_method_and_code_and_rewards_by_reason(
        served: tuple[Api, int]) -> None:
    api, metrics_port = served
    await reward_type(api)
    await promotion(api, customer_cap=2)
    responses = [await get_reward(api, f"c{i}") for i in range(3)]
    again = await get_reward(api, "c0")
    assert again.existing
    assert [r.HasField("grant") for r in responses] == [True, True, False]
    stub = ppb_grpc.PromotionServiceStub(api.channel)
    with pytest.raises(grpc.RpcError):
        await stub.GetPromotion(ppb.GetPromotionRequest(promotion_code="NOPE"),
                                metadata=api.key())
    with pytest.raises(grpc.RpcError):
        await stub.GetPromotion(ppb.GetPromotionRequest(promotion_code="VIP25"))  # no key

    samples = await _scrape(metrics_port)
    rpc = "promo_rpc_handled_total"
    assert _value(samples, rpc, grpc_service="promo.v1.RewardService", grpc_method="GetReward",
                  grpc_code="OK") == 4
    assert _value(samples, rpc, grpc_service="promo.v1.PromotionService",
                  grpc_method="CreatePromotion", grpc_code="OK") == 1
    assert _value(samples, rpc, grpc_service="promo.v1.RewardTypeService",
                  grpc_method="CreateRewardType", grpc_code="OK") == 1
    assert _value(samples, rpc, grpc_service="promo.v1.PromotionService",
                  grpc_method="GetPromotion", grpc_code="NOT_FOUND") == 1
    assert _value(samples, rpc, grpc_service="promo.v1.PromotionService",
                  grpc_method="GetPromotion", grpc_code="UNAUTHENTICATED") == 1
    latency = dict(grpc_service="promo.v1.RewardService", grpc_method="GetReward",
                   grpc_code="OK")
    assert _value(samples, "promo_rpc_duration_seconds_count", **latency) == 4
    assert _value(samples, "promo_rpc_duration_seconds_bucket", **latency, le="+Inf") == 4
    total_seconds = _value(samples, "promo_rpc_duration_seconds_sum", **latency)
    assert total_seconds is not None and 0 < total_seconds < 10
    assert _value(samples, "promo_rewards_total", outcome="granted", reason="") == 2
    assert _value(samples, "promo_rewards_total", outcome="existing", reason="") == 1
    assert _value(samples, "promo_rewards_total", outcome="denied",
                  reason="CUSTOMER_CAP_REACHED") == 1
    # Health checks are public and not counted.
    assert not any(name == rpc and ("grpc_service", "grpc.health.v1.Health") in labels
                   for name, labels in samples)


@pytest.fixture
async def live_api(settings: Settings, pool: asyncpg.Pool) -> AsyncIterator[Api]:
    """An in-process server on the real clock (the worker subprocess runs on it too)."""
    running = await start_server(settings, Dependencies(pool=pool, clock=SystemClock()))
    channel = aio.insecure_channel(running.address)
    try:
        yield Api(channel=channel, address=running.address)
    finally:
        await channel.close()
        await running.stop(0)


async def test_worker_reports_deliveries_batches_and_the_outbox(
        settings: Settings, live_api: Api, pool: asyncpg.Pool) -> None:
    listener = await WebhookListener().start()
    metrics_port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "worker",
        env=_env(settings, PROMO_WORKER_METRICS_PORT=str(metrics_port),
                 PROMO_SWEEPER_INTERVAL_SECONDS="1"), cwd=PROJECT_ROOT)
    try:
        await _until_scraped(metrics_port, proc)
        await lpb_grpc.ListenerServiceStub(live_api.channel).RegisterListener(
            lpb.RegisterListenerRequest(request_id="l5", listener=lpb.Listener(
                event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN, url=listener.url,
                secret=SECRET)), metadata=live_api.key())
        await reward_type(live_api)
        await promotion(live_api)
        # Inside the clearance lead (30 minutes): announced at once; executes in 20 minutes.
        await create_campaign(live_api, "weekend", datetime.now(UTC) + timedelta(minutes=20),
                              customers=["c1", "c2"])
        for _ in range(300):
            if listener.received:
                break
            await asyncio.sleep(0.1)
        assert len(listener.received) == 1 and listener.received[0].verify_error is None
        for _ in range(100):  # the delivery is recorded just after the listener answered
            samples = await _scrape(metrics_port)
            if _value(samples, "promo_webhook_deliveries_total", channel="webhook",
                      outcome="delivered"):
                break
            await asyncio.sleep(0.1)
        assert _value(samples, "promo_webhook_deliveries_total", channel="webhook",
                      outcome="delivered") == 1
        assert _value(samples, "promo_webhook_attempt_duration_seconds_count",
                      channel="webhook") == 1
        assert _value(samples, "promo_webhook_batch_duration_seconds_count") == 1
        assert _value(samples, "promo_webhook_batch_claimed_total") == 1
        # Left in the outbox: the campaign's execution, due in 20 minutes.
        pending = {kind: n for kind, n in await pool.fetch(
            "SELECT kind, count(*) FROM outbox_jobs WHERE status = 'pending' GROUP BY kind")}
        assert pending == {"campaign.execute": 1}
        assert _value(samples, "promo_outbox_pending_jobs", kind="campaign.execute") == 1
        assert _value(samples, "promo_outbox_due_jobs", kind="campaign.execute") == 0
        assert _value(samples, "promo_outbox_oldest_due_age_seconds",
                      kind="campaign.execute") == 0
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=30)
        await listener.stop()


async def test_server_reports_cap_usage_and_code_inventory(served: tuple[Api, int]) -> None:
    api, metrics_port = served
    await reward_type(api)
    await promotion(api, customer_cap=5, caps=[
        ppb.BudgetCap(reward_type="cashback", period=ppb.CAP_PERIOD_DAILY, limit="100")])
    for customer in ("a", "b"):
        await get_reward(api, customer)
    await code_promotion(api, "FLASH48", fallback="FB")
    await upload(api, "FLASH48", codes_file("FL", 5), "u1")
    await get_reward(api, "a", "FLASH48")

    samples = await _scrape(metrics_port)
    assert _value(samples, "promo_cap_used", promotion="VIP25", scope="#customers",
                  period="LIFETIME") == 2
    assert _value(samples, "promo_cap_limit", promotion="VIP25", scope="#customers",
                  period="LIFETIME") == 5
    assert _value(samples, "promo_cap_used", promotion="VIP25", scope="cashback",
                  period="DAILY") == 30  # two grants of 15
    assert _value(samples, "promo_cap_limit", promotion="VIP25", scope="cashback",
                  period="DAILY") == 100
    assert _value(samples, "promo_code_pool_available", promotion="FLASH48") == 4
    assert _value(samples, "promo_code_pool_used", promotion="FLASH48") == 1
    assert _value(samples, "promo_code_pool_fallback_grants", promotion="FLASH48") == 0
