"""CustomerService through a real server: customers, event ingestion (idempotent, all or
nothing, every rejection named by position), the unknown-customer policy, paging and roles."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import timestamp_pb2

from core.clock import FixedClock
from promo.v1 import customers_pb2 as pb
from promo.v1 import customers_pb2_grpc as pb_grpc
from server.errors import error_info_of
from tests.conftest import Api, rpc_error_reason

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)  # the clock fixture's time


def ts(value: datetime) -> timestamp_pb2.Timestamp:
    out = timestamp_pb2.Timestamp()
    out.FromDatetime(value)
    return out


def event(external_id: str, customer_id: str = "c1", kind: str = "bet", amount: str = "10",
          currency: str = "EUR", occurred_at: datetime | None = NOW - timedelta(hours=1),
          **attributes: str) -> pb.Event:
    message = pb.Event(external_id=external_id, customer_id=customer_id, kind=kind,
                       amount=amount, currency=currency, attributes=attributes)
    if occurred_at is not None:
        message.occurred_at.CopyFrom(ts(occurred_at))
    return message


async def count_events(pool: asyncpg.Pool) -> int:
    return int(await pool.fetchval("SELECT count(*) FROM events"))


@pytest.fixture
def stub(api: Api) -> pb_grpc.CustomerServiceStub:
    return pb_grpc.CustomerServiceStub(api.channel)


async def upsert(stub: pb_grpc.CustomerServiceStub, api: Api, *customer_ids: str,
                 request_id: str = "up") -> pb.UpsertCustomersResponse:
    response: pb.UpsertCustomersResponse = await stub.UpsertCustomers(
        pb.UpsertCustomersRequest(request_id=request_id,
                                  customers=[pb.Customer(customer_id=c) for c in customer_ids]),
        metadata=api.key("runtime"))
    return response


async def record(stub: pb_grpc.CustomerServiceStub, api: Api, events: list[pb.Event], *,
                 request_id: str = "rec", create_missing: bool = False,
                 role: str = "runtime") -> pb.RecordEventsResponse:
    response: pb.RecordEventsResponse = await stub.RecordEvents(
        pb.RecordEventsRequest(request_id=request_id, events=events,
                               create_missing_customers=create_missing),
        metadata=api.key(role))
    return response


# --- customers -----------------------------------------------------------------------------

async def test_upsert_get_and_replace(api: Api, stub: pb_grpc.CustomerServiceStub) -> None:
    customer = pb.Customer(customer_id="alice", time_zone="Europe/Malta", currency="EUR",
                           properties={"vip_level": pb.PropertyValue(decimal_value="3"),
                                       "balance": pb.PropertyValue(decimal_value="1234.500001"),
                                       "kyc_done": pb.PropertyValue(bool_value=True),
                                       "segment": pb.PropertyValue(string_value="high rollers")})
    first = await stub.UpsertCustomers(
        pb.UpsertCustomersRequest(request_id="u1", customers=[customer,
                                                              pb.Customer(customer_id="bob")]),
        metadata=api.key("runtime"))
    assert (first.created_count, first.updated_count) == (2, 0)

    got = (await stub.GetCustomer(pb.GetCustomerRequest(customer_id="alice"),
                                  metadata=api.key())).customer
    assert (got.time_zone, got.currency) == ("Europe/Malta", "EUR")
    assert got.properties["balance"].decimal_value == "1234.500001"  # exact, not a double
    assert got.properties["vip_level"].decimal_value == "3"
    assert got.properties["kyc_done"].bool_value is True
    assert got.properties["segment"].string_value == "high rollers"
    assert got.create_time.seconds > 0

    # Upsert replaces the whole customer: omitted fields are cleared.
    second = await stub.UpsertCustomers(
        pb.UpsertCustomersRequest(request_id="u2", customers=[pb.Customer(
            customer_id="alice", properties={"vip_level": pb.PropertyValue(decimal_value="4")})]),
        metadata=api.key("runtime"))
    assert (second.created_count, second.updated_count) == (0, 1)
    got = (await stub.GetCustomer(pb.GetCustomerRequest(customer_id="alice"),
                                  metadata=api.key())).customer
    assert (got.time_zone, got.currency) == ("", "")
    assert dict(got.properties) == {"vip_level": pb.PropertyValue(decimal_value="4")}

    with pytest.raises(grpc.RpcError) as err:
        await stub.GetCustomer(pb.GetCustomerRequest(customer_id="nobody"), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert rpc_error_reason(err.value) == "CUSTOMER_NOT_FOUND"


@pytest.mark.parametrize(
    ("customer", "fragment"),
    [
        (pb.Customer(customer_id=""), "customers[1]: customer_id is required"),
        (pb.Customer(customer_id="x", time_zone="Mars/Base"),
         "customers[1]: time_zone must be an IANA time zone name"),
        (pb.Customer(customer_id="x", currency="eur"),
         "customers[1]: currency must be three uppercase letters"),
        (pb.Customer(customer_id="x", properties={"p": pb.PropertyValue(decimal_value="1e3x")}),
         "customers[1]: property 'p' must be a decimal number"),
        (pb.Customer(customer_id="x", properties={" padded": pb.PropertyValue(bool_value=True)}),
         "customers[1]: property name ' padded' must be 1-64 printable characters without "
         "leading or trailing spaces"),
        (pb.Customer(customer_id="x", properties={"tab\there": pb.PropertyValue(bool_value=True)}),
         "customers[1]: property name 'tab\\there' must be"),
        (pb.Customer(customer_id="x", properties={"p": pb.PropertyValue()}),
         "customers[1]: property 'p' has no value"),
        (pb.Customer(customer_id="ok"), "customers[1]: customer_id 'ok' repeats customers[0]"),
    ],
)
async def test_bad_customers_are_rejected_by_position(
        api: Api, stub: pb_grpc.CustomerServiceStub, pool: asyncpg.Pool, customer: pb.Customer,
        fragment: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        await stub.UpsertCustomers(pb.UpsertCustomersRequest(
            request_id="u", customers=[pb.Customer(customer_id="ok"), customer]),
            metadata=api.key("runtime"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info_of(err.value)
    assert info is not None and info.reason == "INVALID_CUSTOMERS"
    assert info.metadata["first_index"] == "1"
    assert fragment in (err.value.details() or "")
    assert await pool.fetchval("SELECT count(*) FROM customers") == 0


async def test_list_customers_pages(api: Api, stub: pb_grpc.CustomerServiceStub) -> None:
    ids = [f"cust-{i:03d}" for i in range(12)]
    await upsert(stub, api, *reversed(ids))
    seen: list[str] = []
    token = ""
    while True:
        page = await stub.ListCustomers(pb.ListCustomersRequest(page_size=5, page_token=token),
                                        metadata=api.key())
        seen += [c.customer_id for c in page.customers]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids


# --- events --------------------------------------------------------------------------------

async def test_record_and_list_events_newest_first(
        api: Api, stub: pb_grpc.CustomerServiceStub) -> None:
    await upsert(stub, api, "c1", "c2")
    events = [event(f"e{i}", occurred_at=NOW - timedelta(minutes=30 - i),
                    kind="deposit" if i % 3 == 0 else "bet", amount=f"{i}.25",
                    game="gold_quest") for i in range(10)]
    # Two events at the same instant: the later-recorded one lists first.
    events += [event("tie-a", occurred_at=NOW - timedelta(minutes=5)),
               event("tie-b", occurred_at=NOW - timedelta(minutes=5))]
    events += [event("other", customer_id="c2")]
    answer = await record(stub, api, events)
    assert (answer.inserted_count, answer.duplicate_count, answer.created_customer_count) == \
        (13, 0, 0)

    seen: list[pb.Event] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListCustomerEvents(pb.ListCustomerEventsRequest(
            customer_id="c1", page_size=4, page_token=token), metadata=api.key())
        seen += page.events
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert pages == 3
    assert [e.external_id for e in seen] == \
        ["tie-b", "tie-a", *(f"e{i}" for i in reversed(range(10)))]
    first = seen[-1]
    assert (first.kind, first.amount, first.currency) == ("deposit", "0.250000", "EUR")
    assert dict(first.attributes) == {"game": "gold_quest"}
    assert first.occurred_at.ToDatetime(tzinfo=UTC) == NOW - timedelta(minutes=30)
    assert first.event_id > 0 and first.record_time.seconds > 0

    deposits = await stub.ListCustomerEvents(pb.ListCustomerEventsRequest(
        customer_id="c1", kinds=["deposit"], page_size=2), metadata=api.key())
    assert [e.external_id for e in deposits.events] == ["e9", "e6"]
    rest = await stub.ListCustomerEvents(pb.ListCustomerEventsRequest(
        customer_id="c1", kinds=["deposit"], page_size=2, page_token=deposits.next_page_token),
        metadata=api.key())
    assert [e.external_id for e in rest.events] == ["e3", "e0"]
    assert rest.next_page_token == ""

    # A token only works with the filters it was issued for.
    with pytest.raises(grpc.RpcError) as err:
        await stub.ListCustomerEvents(pb.ListCustomerEventsRequest(
            customer_id="c1", page_size=2, page_token=deposits.next_page_token),
            metadata=api.key())
    assert rpc_error_reason(err.value) == "INVALID_PAGE_TOKEN"
    with pytest.raises(grpc.RpcError) as err:
        await stub.ListCustomerEvents(pb.ListCustomerEventsRequest(customer_id="nobody"),
                                      metadata=api.key())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_retried_batch_adds_nothing_twice(
        api: Api, stub: pb_grpc.CustomerServiceStub, pool: asyncpg.Pool) -> None:
    await upsert(stub, api, "c1")
    batch = [event(f"e{i}") for i in range(50)]
    first = await record(stub, api, batch, request_id="r1")
    assert (first.inserted_count, first.duplicate_count) == (50, 0)
    # The same request id: the first answer, nothing written.
    again = await record(stub, api, batch, request_id="r1")
    assert again == first
    # The ingesting system lost the answer and resent the batch under a new request id:
    # external ids make it a no-op.
    retry = await record(stub, api, batch, request_id="r2")
    assert (retry.inserted_count, retry.duplicate_count) == (0, 50)
    # Overlapping batch: only the new events count.
    overlap = await record(stub, api, [*batch[40:], event("new1"), event("new2")],
                           request_id="r3")
    assert (overlap.inserted_count, overlap.duplicate_count) == (2, 10)
    assert await count_events(pool) == 52


async def test_rejected_batch_writes_nothing(
        api: Api, stub: pb_grpc.CustomerServiceStub, pool: asyncpg.Pool) -> None:
    await upsert(stub, api, "c1")
    await record(stub, api, [event("before")], request_id="r0")
    before = await count_events(pool)
    customers_before = await pool.fetchval("SELECT count(*) FROM customers")
    batch = [event(f"ok{i}") for i in range(20)] + [event("bad", amount="-1")] + \
        [event("ghost", customer_id="unknown-customer")]
    with pytest.raises(grpc.RpcError) as err:
        await record(stub, api, batch, request_id="r1")
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await count_events(pool) == before
    assert await pool.fetchval("SELECT count(*) FROM customers") == customers_before
    # The request id was not used up: the fixed batch goes through under it.
    fixed = await record(stub, api, batch[:20], request_id="r1")
    assert fixed.inserted_count == 20


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (event(""), "events[2]: external_id is required"),
        (event("e0"), "events[2]: external_id 'e0' repeats events[0]"),
        (event("x", customer_id="nobody"),
         "events[2]: customer 'nobody' does not exist: create it with UpsertCustomers first or "
         "set create_missing_customers"),
        (event("x", customer_id=""), "events[2]: customer_id is required"),
        (event("x", amount="-0.01"),
         "events[2]: amount must not be negative for kind 'bet', got '-0.01'"),
        (event("x", kind="win", amount="-5"), "events[2]: amount must not be negative for kind "
                                              "'win'"),
        (event("x", kind="deposit", amount="-5"), "amount must not be negative for kind "
                                                  "'deposit'"),
        (event("x", kind="withdrawal", amount="-5"), "amount must not be negative for kind "
                                                     "'withdrawal'"),
        (event("x", amount=""), "events[2]: amount is required"),
        (event("x", amount="ten"), "events[2]: amount must be a decimal number such as 10.50, "
                                   "got 'ten'"),
        (event("x", amount="1.1234567"), "events[2]: amount allows at most"),
        (event("x", currency=""), "events[2]: currency is required (ISO 4217, e.g. 'EUR')"),
        (event("x", currency="euro"),
         "events[2]: currency must be three uppercase letters (ISO 4217) such as 'EUR', "
         "got 'euro'"),
        (event("x", occurred_at=NOW + timedelta(minutes=5, seconds=1)),
         "events[2]: occurred_at 2026-11-22T10:05:01+00:00 is more than 5 minutes after the "
         "server's time 2026-11-22T10:00:00+00:00"),
        (event("x", occurred_at=None), "events[2]: occurred_at is required"),
        (event("x", kind="Bet"), "events[2]: kind must match [a-z][a-z0-9_]{0,39}"),
        (event("x", kind=""), "events[2]: kind is required"),
        (pb.Event(external_id="x", customer_id="c1", kind="bet", amount="1", currency="EUR",
                  occurred_at=ts(NOW), attributes={"currency": "USD"}),
         "events[2]: attribute name 'currency' is reserved for the event's own currency"),
    ],
)
async def test_each_bad_event_is_named_by_position(
        api: Api, stub: pb_grpc.CustomerServiceStub, pool: asyncpg.Pool, bad: pb.Event,
        message: str) -> None:
    await upsert(stub, api, "c1")
    with pytest.raises(grpc.RpcError) as err:
        await record(stub, api, [event("e0"), event("e1"), bad, event("e3")])
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    info = error_info_of(err.value)
    assert info is not None and info.reason == "INVALID_EVENTS"
    assert (info.metadata["first_index"], info.metadata["count"]) == ("2", "1")
    details = err.value.details() or ""
    assert details.startswith("1 problem in events, nothing was written: ")
    assert message in details
    assert await count_events(pool) == 0


async def test_edge_values_are_accepted(api: Api, stub: pb_grpc.CustomerServiceStub,
                                        clock: FixedClock) -> None:
    await upsert(stub, api, "c1")
    answer = await record(stub, api, [
        event("exactly-5-min-ahead", occurred_at=clock.now() + timedelta(minutes=5)),
        event("custom-negative", kind="bonus_correction", amount="-12.5"),
        event("zero-bet", amount="0"),
    ])
    assert answer.inserted_count == 3


async def test_many_problems_are_summarised(api: Api, stub: pb_grpc.CustomerServiceStub) -> None:
    await upsert(stub, api, "c1")
    batch = [event(f"e{i}", amount="-1" if i % 2 else "1") for i in range(30)]
    with pytest.raises(grpc.RpcError) as err:
        await record(stub, api, batch)
    info = error_info_of(err.value)
    assert info is not None
    assert (info.metadata["first_index"], info.metadata["count"]) == ("1", "15")
    details = err.value.details() or ""
    assert details.startswith("15 problems in events, nothing was written: events[1]: ")
    assert details.count("events[") == 10
    assert "events[19]: amount must not be negative" in details
    assert "events[21]" not in details
    assert details.endswith("; and 5 more")


async def test_batch_size_limits(api: Api, stub: pb_grpc.CustomerServiceStub) -> None:
    await upsert(stub, api, "c1")
    template = event("x")
    too_many = []
    for i in range(10_001):
        item = pb.Event()
        item.CopyFrom(template)
        item.external_id = str(i)
        too_many.append(item)
    with pytest.raises(grpc.RpcError) as err:
        await record(stub, api, too_many)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == "BATCH_TOO_LARGE"
    assert "10,001 events in one batch; at most 10,000" in (err.value.details() or "")
    with pytest.raises(grpc.RpcError) as err:
        await record(stub, api, [])
    assert rpc_error_reason(err.value) == "EMPTY_BATCH"


async def test_a_full_batch_of_10000_is_accepted(
        api: Api, stub: pb_grpc.CustomerServiceStub, pool: asyncpg.Pool) -> None:
    template = event("x", game_category="Slots")
    batch = []
    for i in range(10_000):
        item = pb.Event()
        item.CopyFrom(template)
        item.external_id = f"big-{i}"
        item.customer_id = f"c{i % 500}"
        batch.append(item)
    answer = await record(stub, api, batch, create_missing=True)
    assert (answer.inserted_count, answer.created_customer_count) == (10_000, 500)
    assert await count_events(pool) == 10_000


async def test_unknown_customers_policy(
        api: Api, stub: pb_grpc.CustomerServiceStub, pool: asyncpg.Pool) -> None:
    await upsert(stub, api, "known")
    batch = [event("a", customer_id="known"), event("b", customer_id="new-1"),
             event("c", customer_id="new-2"), event("d", customer_id="new-1")]
    with pytest.raises(grpc.RpcError) as err:
        await record(stub, api, batch, request_id="r1")
    info = error_info_of(err.value)
    assert info is not None and info.reason == "INVALID_EVENTS"
    assert (info.metadata["first_index"], info.metadata["count"]) == ("1", "3")
    details = err.value.details() or ""
    for index, customer in ((1, "new-1"), (2, "new-2"), (3, "new-1")):
        assert f"events[{index}]: customer '{customer}' does not exist" in details
    assert await count_events(pool) == 0
    assert await pool.fetchval("SELECT count(*) FROM customers") == 1

    answer = await record(stub, api, batch, request_id="r2", create_missing=True)
    assert (answer.inserted_count, answer.created_customer_count) == (4, 2)
    created = (await stub.GetCustomer(pb.GetCustomerRequest(customer_id="new-1"),
                                      metadata=api.key())).customer
    assert (created.time_zone, created.currency, len(created.properties)) == ("", "", 0)


async def test_unknown_customers_are_reported_with_other_problems(
        api: Api, stub: pb_grpc.CustomerServiceStub) -> None:
    await upsert(stub, api, "c1")
    with pytest.raises(grpc.RpcError) as err:
        await record(stub, api, [event("a", customer_id="ghost"), event("b", currency="")])
    details = err.value.details() or ""
    assert details.startswith("2 problems in events")
    assert "events[0]: customer 'ghost' does not exist" in details
    assert "events[1]: currency is required" in details


async def test_roles(api: Api, stub: pb_grpc.CustomerServiceStub) -> None:
    # runtime writes; admin may do everything; reads are admin only; listener may do nothing.
    await upsert(stub, api, "c1")
    await record(stub, api, [event("e1")], role="runtime")
    await record(stub, api, [event("e2")], request_id="r-admin", role="admin")
    reads = [
        lambda key: stub.GetCustomer(pb.GetCustomerRequest(customer_id="c1"), metadata=key),
        lambda key: stub.ListCustomers(pb.ListCustomersRequest(), metadata=key),
        lambda key: stub.ListCustomerEvents(pb.ListCustomerEventsRequest(customer_id="c1"),
                                            metadata=key),
    ]
    for read in reads:
        await read(api.key("admin"))
        for role in ("runtime", "listener"):
            with pytest.raises(grpc.RpcError) as err:
                await read(api.key(role))
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        await record(stub, api, [event("e3")], request_id="r-l", role="listener")
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        await stub.UpsertCustomers(pb.UpsertCustomersRequest(
            request_id="u", customers=[pb.Customer(customer_id="x")]),
            metadata=api.key("listener"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    with pytest.raises(grpc.RpcError) as err:
        await stub.ListCustomers(pb.ListCustomersRequest())
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_request_id_is_required(api: Api, stub: pb_grpc.CustomerServiceStub) -> None:
    await upsert(stub, api, "c1")
    with pytest.raises(grpc.RpcError) as err:
        await record(stub, api, [event("e1")], request_id="")
    assert rpc_error_reason(err.value) == "INVALID_REQUEST_ID"
