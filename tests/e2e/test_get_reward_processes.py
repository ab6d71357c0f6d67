"""Exact caps across server processes: a real `promo serve` subprocess and the in-process test
server share one database; 400 concurrent GetReward calls split between them grant exactly the
customer cap, and the budget counter equals the sum of the grants."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from decimal import Decimal
from pathlib import Path

import asyncpg
import pytest
from grpc import aio

from config.settings import Settings
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc
from tests.conftest import ADMIN_KEY, RUNTIME_KEY, Api
from tests.e2e.promo_helpers import cap, get_reward, promotion, reward_type
from tests.e2e.test_promo_up import _free_port

PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
async def other_process(settings: Settings) -> AsyncIterator[Api]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    env.update(PROMO_DATABASE_URL=settings.database_url or "", PROMO_GRPC_PORT=str(port),
               PROMO_LOG_LEVEL="WARNING", PROMO_MIGRATE_ON_START="false",
               PROMO_API_KEYS=json.dumps([
                   {"name": "admin", "key": ADMIN_KEY, "roles": ["admin"]},
                   {"name": "runtime", "key": RUNTIME_KEY, "roles": ["runtime"]}]))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "cli.main", "serve", env=env,
        cwd=PROJECT_ROOT)
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    try:
        await asyncio.wait_for(channel.channel_ready(), timeout=30)
        yield Api(channel=channel, address=f"127.0.0.1:{port}")
    finally:
        await channel.close()
        proc.terminate()
        await asyncio.wait_for(proc.wait(), timeout=30)


async def test_caps_hold_across_two_server_processes(api: Api, other_process: Api,
                                                     pool: asyncpg.Pool) -> None:
    await reward_type(api)
    await promotion(api, customer_cap=100, caps=[cap(ppb.CAP_PERIOD_LIFETIME, "1400")])
    stubs = [rpb_grpc.RewardServiceStub(api.channel),
             rpb_grpc.RewardServiceStub(other_process.channel)]
    responses = await asyncio.gather(*(
        get_reward(api, f"c{i}", stub=stubs[i % 2]) for i in range(400)))
    granted = [r for r in responses if r.HasField("grant")]
    assert len(granted) == 93  # 93 * 15 = 1395; the budget binds before the customer cap
    assert {r.denial_reason for r in responses if not r.HasField("grant")} == {
        rpb.DENIAL_REASON_BUDGET_CAP_REACHED}
    used = await pool.fetchval("SELECT used FROM cap_usage WHERE scope = 'cashback'")
    assert used == Decimal(15) * len(granted) <= Decimal(1400)
    customers = await pool.fetchval("SELECT used FROM cap_usage WHERE scope = '#customers'")
    assert customers == len(granted)
