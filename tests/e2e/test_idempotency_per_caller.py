"""A stored answer is replayed only to the caller that made the request (the API key's
configured name):

- another caller reusing a request id is INVALID_ARGUMENT REQUEST_ID_REUSED, even with the
  same input, and nothing is done for it; before, the same input got the first caller's stored
  answer, a generated listener secret included;
- the caller's own retry still replays its answer, also under a key rotated with the same name,
  and its reuse with other input is still REQUEST_ID_REUSED;
- an answer stored before callers were recorded (migration 0022: caller '') still answers a
  retry of its request id from any caller, so an upgrade never fails an in-flight retry.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import asyncpg
import grpc
import pytest
from grpc import aio

from config.settings import ApiKeyConfig, Settings
from core.clock import FixedClock
from promo.v1 import customers_pb2 as cpb
from promo.v1 import customers_pb2_grpc as cpb_grpc
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from tests.conftest import TEST_API_KEYS, rpc_error_reason, serving_api

OPS_KEY = "ops-key-0123456789abcdef0123456789"
OPS_KEY_ROTATED = "ops-key-rotated-0123456789abcdef01"
SECOND_KEY = "second-admin-key-0123456789abcdef01"
ANOTHER_CALLER = ("request_id 'batch-1' was already used by another caller; request ids are "
                  "shared by all callers: use a new request_id (e.g. with a prefix of your own)")


def _meta(key: str) -> tuple[tuple[str, str], ...]:
    return (("x-api-key", key),)


@pytest.fixture
async def channel(settings: Settings, pool: asyncpg.Pool,
                  clock: FixedClock) -> AsyncIterator[aio.Channel]:
    """A server whose callers include "ops" (under two keys: before and after a rotation) and
    "second-admin", all admins."""
    keys = [*TEST_API_KEYS,
            ApiKeyConfig(name="ops", key=OPS_KEY, roles=["admin"]),
            ApiKeyConfig(name="ops", key=OPS_KEY_ROTATED, roles=["admin"]),
            ApiKeyConfig(name="second-admin", key=SECOND_KEY, roles=["admin"])]
    async with serving_api(settings.model_copy(update={"api_keys": keys}), pool,
                           clock) as running:
        yield running.channel


def _upsert(request_id: str, customer_id: str) -> cpb.UpsertCustomersRequest:
    return cpb.UpsertCustomersRequest(request_id=request_id, customers=[
        cpb.Customer(customer_id=customer_id, currency="EUR", time_zone="UTC")])


async def _refused(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call  # type: ignore[misc]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(caught.value) == "REQUEST_ID_REUSED"
    return caught.value


async def test_another_caller_reusing_a_request_id_is_refused_and_nothing_is_done(
        channel: aio.Channel, pool: asyncpg.Pool) -> None:
    stub = cpb_grpc.CustomerServiceStub(channel)
    await stub.UpsertCustomers(_upsert("batch-1", "c-ops"), metadata=_meta(OPS_KEY))
    for other in (_upsert("batch-1", "c-second"), _upsert("batch-1", "c-ops")):
        refused = await _refused(stub.UpsertCustomers(other, metadata=_meta(SECOND_KEY)))
        assert refused.details() == ANOTHER_CALLER
    async with pool.acquire() as conn:
        assert [tuple(r) for r in await conn.fetch(
            "SELECT customer_id FROM customers ORDER BY customer_id")] == [("c-ops",)]
        assert [tuple(r) for r in await conn.fetch(
            "SELECT scope, caller, request_id FROM idempotency_keys")] == [
            ("UpsertCustomers", "ops", "batch-1")]


async def test_a_generated_listener_secret_is_never_replayed_to_another_caller(
        channel: aio.Channel, pool: asyncpg.Pool) -> None:
    stub = lpb_grpc.ListenerServiceStub(channel)
    request = lpb.RegisterListenerRequest(request_id="listener-1", listener=lpb.Listener(
        event_type=lpb.EVENT_TYPE_BONUS_ISSUED, url="https://hooks.example.com/bonus"))
    first = await stub.RegisterListener(request, metadata=_meta(OPS_KEY))
    assert len(first.generated_secret) == 43
    assert await stub.RegisterListener(request, metadata=_meta(OPS_KEY)) == first  # a retry
    refused = await _refused(stub.RegisterListener(request, metadata=_meta(SECOND_KEY)))
    assert first.generated_secret not in refused.details()
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM webhook_listeners") == 1


async def test_the_callers_retry_replays_also_under_a_rotated_key(
        channel: aio.Channel, pool: asyncpg.Pool) -> None:
    stub = cpb_grpc.CustomerServiceStub(channel)
    first = await stub.UpsertCustomers(_upsert("batch-1", "c1"), metadata=_meta(OPS_KEY))
    assert await stub.UpsertCustomers(_upsert("batch-1", "c1"),
                                      metadata=_meta(OPS_KEY_ROTATED)) == first
    refused = await _refused(stub.UpsertCustomers(_upsert("batch-1", "c2"),
                                                  metadata=_meta(OPS_KEY_ROTATED)))
    assert "already used for a different request" in refused.details()
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM customers") == 1


async def test_an_answer_stored_before_the_upgrade_still_answers_its_retry(
        channel: aio.Channel, pool: asyncpg.Pool) -> None:
    """A row with migration 0022's default caller '' (stored by the previous version, which
    did not record callers) is replayed to whoever retries: not run a second time; other
    input is still REQUEST_ID_REUSED."""
    stub = cpb_grpc.CustomerServiceStub(channel)
    first = await stub.UpsertCustomers(_upsert("old-1", "c1"), metadata=_meta(OPS_KEY))
    async with pool.acquire() as conn:
        await conn.execute("UPDATE idempotency_keys SET caller = ''")  # as the old version did
        await conn.execute("DELETE FROM customers")
    assert await stub.UpsertCustomers(_upsert("old-1", "c1"), metadata=_meta(SECOND_KEY)) == first
    await _refused(stub.UpsertCustomers(_upsert("old-1", "c9"), metadata=_meta(OPS_KEY)))
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM customers") == 0  # not run again
