"""CustomerService: thin translation between protobuf and core/storage for customer data.

Writes come from ingesting systems (role ``runtime``); reads are for operators (``admin``).
Batches are validated completely in core.customers before any write, so a rejected batch
names every bad item and changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import asyncpg
from grpc import aio

from core import customers as domain
from core.errors import InvalidArgument
from core.money import format_decimal, plain
from core.pagination import effective_page_size
from promo.v1 import customers_pb2 as pb
from promo.v1 import customers_pb2_grpc as pb_grpc
from server.convert import required_id, run_request_once, timestamp, timestamp_problem
from server.deps import Dependencies
from server.page_bytes import fit_page
from server.page_tokens import decode_page_token, encode_page_token
from storage import bonus_triggers as triggers_repo
from storage import customers as customers_repo
from storage import events as events_repo
from storage.queue import queue_after_commit

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["CustomerService"].full_name
ROLES = {
    f"/{SERVICE_NAME}/UpsertCustomers": {"runtime"},
    f"/{SERVICE_NAME}/RecordEvents": {"runtime"},
    f"/{SERVICE_NAME}/GetCustomer": {"admin"},
    f"/{SERVICE_NAME}/ListCustomers": {"admin"},
    f"/{SERVICE_NAME}/ListCustomerEvents": {"admin"},
}


# --- protobuf -> core ----------------------------------------------------------------------

def _raw_property(value: pb.PropertyValue) -> domain.RawProperty:
    which = value.WhichOneof("kind")
    if which == "string_value":
        return value.string_value
    if which == "decimal_value":
        return domain.DecimalText(value.decimal_value)
    if which == "bool_value":
        return value.bool_value
    return None


def customer_input(message: pb.Customer) -> domain.CustomerInput:
    return domain.CustomerInput(
        customer_id=message.customer_id, time_zone=message.time_zone, currency=message.currency,
        properties={k: _raw_property(v) for k, v in message.properties.items()})


def _occurred_at(message: pb.Event) -> datetime | domain.Unreadable | None:
    if not message.HasField("occurred_at"):
        return None
    if (problem := timestamp_problem(message.occurred_at)) is not None:
        return domain.Unreadable(problem)
    return message.occurred_at.ToDatetime(tzinfo=UTC)


def event_input(message: pb.Event) -> domain.EventInput:
    return domain.EventInput(
        external_id=message.external_id, customer_id=message.customer_id, kind=message.kind,
        amount=message.amount, currency=message.currency, occurred_at=_occurred_at(message),
        attributes=dict(message.attributes))


# --- core -> protobuf ----------------------------------------------------------------------

def _property_to_pb(value: domain.PropertyValue) -> pb.PropertyValue:
    if isinstance(value, bool):
        return pb.PropertyValue(bool_value=value)
    if isinstance(value, str):
        return pb.PropertyValue(string_value=value)
    return pb.PropertyValue(decimal_value=format_decimal(value))


def customer_to_pb(value: domain.Customer) -> pb.Customer:
    return pb.Customer(
        customer_id=value.customer_id, time_zone=value.time_zone or "",
        currency=value.currency or "",
        properties={k: _property_to_pb(v) for k, v in value.properties.items()},
        create_time=timestamp(value.create_time), update_time=timestamp(value.update_time))


def event_to_pb(value: domain.Event) -> pb.Event:
    return pb.Event(
        external_id=value.external_id, customer_id=value.customer_id, kind=value.kind,
        amount=format_decimal(value.amount), currency=value.currency,
        occurred_at=timestamp(value.occurred_at), attributes=dict(value.attributes),
        event_id=value.event_id or 0, record_time=timestamp(value.record_time))


def _reused_external_ids(events: list[domain.Event],
                         conflicts: Sequence[events_repo.StoredConflict]) -> list[domain.Problem]:
    """One problem per event (by position) whose external id is already another event's: an
    idempotency key reused for different content is the caller's mistake, not a retry."""
    stored = {c.external_id: c for c in conflicts}
    return [domain.Problem(index, (
        f"external_id {e.external_id!r} is already stored for a different event "
        f"(customer {c.customer_id!r}, {c.kind} {format_decimal(plain(c.amount))} {c.currency} at "
        f"{c.occurred_at.isoformat()}): resend that event unchanged, or give this one an "
        "external_id of its own"))
            for index, e in enumerate(events) if (c := stored.get(e.external_id)) is not None]


def _raise_event_problems(problems: list[domain.Problem]) -> None:
    domain.raise_if_problems(problems, noun="events", reason="INVALID_EVENTS")


class CustomerServicer(pb_grpc.CustomerServiceServicer):
    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps
        self._pool = deps.pool
        self._clock = deps.clock

    async def UpsertCustomers(self, request: pb.UpsertCustomersRequest,
                              context: aio.ServicerContext) -> pb.UpsertCustomersResponse:
        customers = domain.validate_customers([customer_input(c) for c in request.customers])

        async def work(conn: asyncpg.Connection) -> bytes:
            outcome = await customers_repo.upsert(conn, customers)
            return pb.UpsertCustomersResponse(
                created_count=outcome.created, updated_count=outcome.updated
            ).SerializeToString()

        raw = await run_request_once(self._pool, "UpsertCustomers", request, work)
        return pb.UpsertCustomersResponse.FromString(raw)

    async def GetCustomer(self, request: pb.GetCustomerRequest,
                          context: aio.ServicerContext) -> pb.GetCustomerResponse:
        _check_customer_id(request.customer_id)
        async with self._pool.acquire() as conn:
            found = await customers_repo.get(conn, request.customer_id)
        return pb.GetCustomerResponse(customer=customer_to_pb(found))

    async def ListCustomers(self, request: pb.ListCustomersRequest,
                            context: aio.ServicerContext) -> pb.ListCustomersResponse:
        size = effective_page_size(request.page_size)
        cursor = decode_page_token(request.page_token, {}, key=(str,))
        after = str(cursor.after[0]) if cursor else None
        async with self._pool.acquire() as conn:
            rows = await customers_repo.list_page(conn, after_id=after, limit=size + 1)
        page, customers, more = fit_page(rows[:size], len(rows) > size, customer_to_pb)
        token = encode_page_token([page[-1].customer_id], {}) if more else ""
        return pb.ListCustomersResponse(customers=customers, next_page_token=token)

    async def RecordEvents(self, request: pb.RecordEventsRequest,
                           context: aio.ServicerContext) -> pb.RecordEventsResponse:
        domain.check_batch_size(len(request.events), "events")
        inputs = [event_input(e) for e in request.events]
        events, problems = domain.validate_events(inputs, self._clock.now())
        create_missing = request.create_missing_customers
        customer_ids = [raw.customer_id for raw in inputs]
        if problems:
            if not create_missing:
                # Report unknown customers in the same answer as the other problems, so one
                # round of fixes is enough.
                async with self._pool.acquire() as conn:
                    missing = await customers_repo.missing(
                        conn, {c for c in customer_ids if domain.is_valid_customer_id(c)})
                problems += domain.unknown_customer_problems(customer_ids, missing)
            _raise_event_problems(problems)

        async def work(conn: asyncpg.Connection) -> bytes:
            outcome = await events_repo.insert_batch(conn, events,
                                                     create_missing=create_missing)
            if outcome.missing_customers:
                # Nothing was inserted; raising rolls back the request id's claim too.
                _raise_event_problems(domain.unknown_customer_problems(
                    customer_ids, outcome.missing_customers))
            if outcome.conflicts:
                # Nothing is kept: raising rolls back the events inserted and the claim.
                _raise_event_problems(_reused_external_ids(events, outcome.conflicts))
            # Dynamic-bonus automation rules count the events just stored (storage/bonuses.py).
            bonus_jobs.extend(await triggers_repo.on_events_recorded(
                conn, {e.kind for e in events}, [e.external_id for e in events],
                now=self._clock.now(), default_window=self._bonus_window()))
            return pb.RecordEventsResponse(
                inserted_count=outcome.inserted, duplicate_count=outcome.duplicates,
                created_customer_count=outcome.created_customers).SerializeToString()

        bonus_jobs: list[tuple[int, datetime]] = []
        raw = await run_request_once(self._pool, "RecordEvents", request, work)
        for job_id, due in bonus_jobs:
            await queue_after_commit(self._deps.redis, job_id=job_id, due_at=due,
                                     queue_name=self._deps.queue_name)
        return pb.RecordEventsResponse.FromString(raw)

    def _bonus_window(self) -> int:
        settings = self._deps.settings
        return settings.bonus_batch_window_seconds if settings else 300

    async def ListCustomerEvents(self, request: pb.ListCustomerEventsRequest,
                                 context: aio.ServicerContext) -> pb.ListCustomerEventsResponse:
        _check_customer_id(request.customer_id)
        kinds = sorted(set(request.kinds))
        for kind in kinds:
            if not domain.KIND_PATTERN.fullmatch(kind):
                raise InvalidArgument(f"kinds: {kind!r} is not an event kind",
                                      reason="INVALID_KIND", metadata={"field": "kinds"})
        size = effective_page_size(request.page_size)
        filters = {"customer_id": request.customer_id, "kinds": kinds}
        cursor = decode_page_token(request.page_token, filters, key=(datetime, int))
        before = None if cursor is None else (cursor.after[0], cursor.after[1])
        async with self._pool.acquire() as conn:
            if cursor is None:
                # An unknown customer is NOT_FOUND rather than an empty list (a typo'd id).
                await customers_repo.get(conn, request.customer_id)
            rows = await events_repo.list_for_customer(
                conn, request.customer_id, kinds=kinds, before=before, limit=size + 1)
        page, events, more = fit_page(rows[:size], len(rows) > size, event_to_pb)
        token = ""
        if more:
            last = page[-1]
            token = encode_page_token([last.occurred_at.isoformat(), last.event_id], filters)
        return pb.ListCustomerEventsResponse(events=events, next_page_token=token)


def _check_customer_id(customer_id: str) -> None:
    required_id(customer_id, "customer_id")
    problem = domain.customer_id_problem(customer_id)
    if problem is not None:
        raise InvalidArgument(problem, reason="INVALID_ID", metadata={"field": "customer_id"})


def register(server: aio.Server, deps: Dependencies) -> None:
    pb_grpc.add_CustomerServiceServicer_to_server(CustomerServicer(deps), server)
