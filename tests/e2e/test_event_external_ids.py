"""An external id is an event's idempotency key: resending the same event is a retry (counted as
a duplicate, stored once), but reusing the id for a different event is the caller's mistake.
It used to be counted as a duplicate too, so the second event (another customer's bet, another
amount) was silently dropped; now the batch is refused as INVALID_EVENTS naming each such event
and what is stored under its id, and nothing of the batch is kept."""

from __future__ import annotations

import asyncpg
import grpc
import pytest

from promo.v1 import customers_pb2 as pb
from promo.v1 import customers_pb2_grpc as pb_grpc
from server.errors import error_info_of
from tests.conftest import Api
from tests.e2e.test_customers_api import NOW, count_events, event, record, upsert


@pytest.fixture
def stub(api: Api) -> pb_grpc.CustomerServiceStub:
    return pb_grpc.CustomerServiceStub(api.channel)


@pytest.mark.parametrize(("changed", "what"), [
    ({"customer_id": "c2"}, "another customer"),
    ({"kind": "win"}, "another kind"),
    ({"amount": "11"}, "another amount"),
    ({"currency": "USD"}, "another currency"),
    ({"occurred_at": NOW.replace(hour=8)}, "another time"),
    ({"game": "Roulette"}, "other attributes"),
])
async def test_an_external_id_reused_for_another_event_is_refused(
        api: Api, stub: pb_grpc.CustomerServiceStub, pool: asyncpg.Pool,
        changed: dict[str, object], what: str) -> None:
    await upsert(stub, api, "c1", "c2")
    await record(stub, api, [event("tx-1", game="Gold Quest")], request_id="first")
    before = await count_events(pool)
    fields: dict[str, object] = {"game": "Gold Quest", **changed}
    with pytest.raises(grpc.RpcError) as caught:
        await record(stub, api, [event("fresh-1"), event("tx-1", **fields)],  # type: ignore
                     request_id="second")
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT, what
    assert caught.value.details() == (
        "1 problem in events, nothing was written: events[1]: external_id 'tx-1' is already "
        "stored for a different event (customer 'c1', bet 10 EUR at "
        "2026-11-22T09:00:00+00:00): resend that event unchanged, or give this one an "
        "external_id of its own")
    info = error_info_of(caught.value)
    assert info is not None and info.reason == "INVALID_EVENTS"
    # Nothing of the batch was kept (fresh-1 neither), and the request id is free again.
    assert await count_events(pool) == before
    fixed = await record(stub, api, [event("fresh-1"), event("tx-2")], request_id="second")
    assert (fixed.inserted_count, fixed.duplicate_count) == (2, 0)


async def test_the_same_event_resent_is_still_a_duplicate(
        api: Api, stub: pb_grpc.CustomerServiceStub, pool: asyncpg.Pool) -> None:
    """Equal content is a retry, also when the amount is written differently (10 = 10.00) or
    the attributes come in another order."""
    await upsert(stub, api, "c1")
    first = pb.Event()
    first.CopyFrom(event("tx-1", amount="10", game="Gold Quest", table="7"))
    await record(stub, api, [first], request_id="first")
    again = event("tx-1", amount="10.00", table="7", game="Gold Quest")
    answer = await record(stub, api, [again, event("tx-2")], request_id="second")
    assert (answer.inserted_count, answer.duplicate_count) == (1, 1)
    assert await count_events(pool) == 2


async def test_every_reused_id_of_a_batch_is_named(
        api: Api, stub: pb_grpc.CustomerServiceStub) -> None:
    await upsert(stub, api, "c1")
    await record(stub, api, [event("a"), event("b"), event("c")], request_id="first")
    with pytest.raises(grpc.RpcError) as caught:
        await record(stub, api, [event("a"), event("b", amount="2"), event("new"),
                                 event("c", kind="deposit")], request_id="second")
    details = caught.value.details()
    assert "events[1]: external_id 'b'" in details
    assert "events[3]: external_id 'c'" in details
    assert "events[0]" not in details and "events[2]" not in details
