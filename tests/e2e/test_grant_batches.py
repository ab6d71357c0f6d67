"""GetReward's group commit: grants batched into one transaction answer exactly as if alone."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from decimal import Decimal

import asyncpg
import pytest
from grpc import aio
from prometheus_client import REGISTRY

from config.settings import Settings
from core.caps import LIFETIME_START
from core.clock import FixedClock
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc
from server.app import Dependencies, start_server
from server.grant_batcher import MAX_BATCH_LIMIT, GrantBatcher
from storage import promotions as repo
from storage.promotions import GrantCharge, GrantRequest
from tests.conftest import Api
from tests.e2e.promo_helpers import cap, get_reward, promotion, reward_type

LIMIT = Decimal(40)


async def _request(pool: asyncpg.Pool, clock: FixedClock, customer: str, request_id: str,
                   amount: str = "15") -> GrantRequest:
    row = await pool.fetchrow("SELECT id, version FROM promotions WHERE code = 'VIP25'")
    assert row is not None
    return GrantRequest(
        promotion_id=row["id"], version=row["version"], customer_id=customer, campaign_key="",
        request_id=request_id,
        rewards=[{"reward_type": "cashback", "kind": "SINGLE", "value": amount}],
        promo_code="VIP25", now=clock.now(), customer_cap=None, customers_start=LIFETIME_START,
        charges=[GrantCharge("cashback", "LIFETIME", LIFETIME_START, Decimal(amount), LIMIT)])


async def _lifetime_cap_promotion(api: Api) -> None:
    await reward_type(api)
    await promotion(api, caps=[cap(ppb.CAP_PERIOD_LIFETIME, str(LIMIT))])


def _sample(name: str) -> float:
    return REGISTRY.get_sample_value(name) or 0.0


async def test_a_batch_answers_each_grant_as_if_it_came_alone(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    await _lifetime_cap_promotion(api)
    batch = [await _request(pool, clock, "a", "a-1"),
             await _request(pool, clock, "b", "b-1"),
             await _request(pool, clock, "a", "a-1"),           # a retry in the same batch
             await _request(pool, clock, "a", "a-2"),           # a's grant, new request id
             await _request(pool, clock, "c", "c-1"),           # 45 > 40: refused alone
             await _request(pool, clock, "d", "d-1", "10")]     # 40: fits after the refusal
    async with pool.acquire() as conn:
        outcomes = await repo.grant_many(conn, batch)
    assert [o.outcome for o in outcomes] == [
        "GRANTED", "GRANTED", "EXISTING", "EXISTING", "BUDGET_CAP_REACHED", "GRANTED"]
    first = outcomes[0].grant_id
    assert outcomes[2].grant_id == first and outcomes[3].grant_id == first
    assert outcomes[2].rewards == [{"reward_type": "cashback", "kind": "SINGLE", "value": "15"}]
    assert (outcomes[4].denied_scope, outcomes[4].denied_period) == ("cashback", "LIFETIME")
    assert len({o.grant_id for o in outcomes if o.grant_id}) == 3
    used = await pool.fetchrow(
        "SELECT used, grants FROM cap_usage WHERE scope = 'cashback' AND period = 'LIFETIME'")
    assert (used["used"], used["grants"]) == (Decimal(40), 3)
    # The refused grant left nothing behind: no grant row, no customer slot.
    assert await pool.fetchval("SELECT count(*) FROM grants") == 3
    assert sorted(r["customer_id"] for r in await pool.fetch(
        "SELECT customer_id FROM promotion_customers")) == ["a", "b", "d"]


async def test_a_failing_batch_is_sent_again_grant_by_grant(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    await _lifetime_cap_promotion(api)
    batcher = GrantBatcher(pool, max_batch=8, max_in_flight=1)
    good = [await _request(pool, clock, f"g{i}", f"g-{i}", "5") for i in range(4)]
    bad = await _request(pool, clock, "nul\x00byte", "bad-1", "5")  # PostgreSQL refuses NUL
    sizes, fallbacks = _sample("promo_grant_batch_size_sum"), _sample(
        "promo_grant_batch_fallbacks_total")
    answers = await asyncio.gather(*(batcher.grant(r) for r in [*good[:2], bad, *good[2:]]),
                                   return_exceptions=True)
    assert isinstance(answers[2], asyncpg.PostgresError)
    assert [a.outcome for a in answers if not isinstance(a, BaseException)] == ["GRANTED"] * 4
    assert _sample("promo_grant_batch_fallbacks_total") == fallbacks + 1
    # The first grant went alone (nothing waited ahead of it), the four queued meanwhile in one
    # batch, which failed and went again one by one.
    assert _sample("promo_grant_batch_size_sum") == sizes + 1 + 4 + 4
    used = await pool.fetchval(
        "SELECT used FROM cap_usage WHERE scope = 'cashback' AND period = 'LIFETIME'")
    assert used == Decimal(20)


@pytest.fixture
async def server_with_batches(request: pytest.FixtureRequest, settings: Settings,
                              pool: asyncpg.Pool, clock: FixedClock
                              ) -> AsyncIterator[tuple[Api, int]]:
    """An in-process server with PROMO_GRANT_BATCH_MAX set to the parameter."""
    configured = settings.model_copy(update={"grant_batch_max": request.param})
    running = await start_server(configured, Dependencies(pool=pool, clock=clock))
    channel = aio.insecure_channel(running.address)
    try:
        yield Api(channel=channel, address=running.address), request.param
    finally:
        await channel.close()
        await running.stop(0)


@pytest.mark.parametrize("server_with_batches", [1, 32], indirect=True)
async def test_concurrent_calls_share_transactions_and_caps_stay_exact(
        server_with_batches: tuple[Api, int]) -> None:
    api, batch_max = server_with_batches
    await reward_type(api)
    await promotion(api, customer_cap=50)
    transactions = _sample("promo_grant_batch_size_count")
    grants = _sample("promo_grant_batch_size_sum")
    stub = rpb_grpc.RewardServiceStub(api.channel)
    responses = await asyncio.gather(*(get_reward(api, f"cust-{i}", stub=stub)
                                       for i in range(120)))
    assert sum(r.HasField("grant") for r in responses) == 50
    assert Counter(r.denial_reason for r in responses if not r.HasField("grant")) == {
        rpb.DENIAL_REASON_CUSTOMER_CAP_REACHED: 70}
    assert _sample("promo_grant_batch_size_sum") - grants == 120
    used = _sample("promo_grant_batch_size_count") - transactions
    if batch_max == 1:
        assert used == 120  # batching off: a transaction per grant
    else:
        assert used < 120  # at least one transaction carried several grants


@pytest.mark.parametrize("size", [0, MAX_BATCH_LIMIT + 1])
def test_batch_sizes_outside_the_limit_are_refused(size: int) -> None:
    with pytest.raises(ValueError, match="max_batch must be 1-60"):
        GrantBatcher(None, max_batch=size)  # type: ignore[arg-type]
