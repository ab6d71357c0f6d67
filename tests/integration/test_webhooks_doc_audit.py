"""docs/webhooks.md, statement by statement, against the engine: real HTTP listeners on
loopback, the outbox runner driven one attempt at a time on a pinned clock (no sleeping for
backoffs or deadlines), and the real gRPC server for the ListenerService rules."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2

from config.settings import Settings
from core.clock import FixedClock
from core.events import EventType
from core.webhook_signature import sign
from promo.v1 import listeners_pb2 as pb
from promo.v1 import listeners_pb2_grpc as pb_grpc
from storage import webhooks as repo
from tests.conftest import Api, rpc_error_reason, serving_api
from tests.e2e.campaign_helpers import create_campaign
from tests.e2e.promo_helpers import promotion, reward_type
from tests.webhook_listener import SECRET, WebhookListener
from workers import campaigns as _campaigns  # noqa: F401  (registers the campaign handlers)
from workers import webhooks
from workers.outbox import run_outbox_job

SCHEDULED = pb.EVENT_TYPE_SCHEDULED_CAMPAIGN


# Helpers.

@contextlib.asynccontextmanager
async def worker_ctx(settings: Settings, pool: asyncpg.Pool,
                     clock: FixedClock) -> AsyncIterator[dict[str, Any]]:
    """What a worker process passes its jobs, on the pinned clock, without Redis."""
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    await webhooks.setup(ctx)
    try:
        yield ctx
    finally:
        await webhooks.teardown(ctx)


async def add_listener(pool: asyncpg.Pool, url: str, *, secret: str = SECRET,
                       event_type: EventType = EventType.SCHEDULED_CAMPAIGN,
                       now: datetime) -> int:
    async with pool.acquire() as conn:
        row = await repo.insert_listener(conn, event_type=int(event_type), url=url,
                                         secret=secret, active=True, description="audit",
                                         now=now)
    return row.id


async def emit(pool: asyncpg.Pool, clock: FixedClock, **kw: Any) -> repo.EmittedEvent:
    kw.setdefault("payload", {"campaign_id": "spring"})
    async with pool.acquire() as conn, conn.transaction():
        emitted = await repo.emit_event(conn, event_type=kw.pop("event_type",
                                                                 EventType.SCHEDULED_CAMPAIGN),
                                        now=clock.now(), **kw)
    assert emitted is not None
    return emitted


async def delivery(pool: asyncpg.Pool, delivery_id: int | None = None) -> repo.DeliveryRow:
    async with pool.acquire() as conn:
        if delivery_id is None:
            delivery_id = await conn.fetchval("SELECT max(id) FROM webhook_deliveries")
        assert delivery_id is not None
        return await repo.get_delivery(conn, delivery_id)


async def attempts_of(pool: asyncpg.Pool, delivery_id: int) -> list[repo.AttemptRow]:
    async with pool.acquire() as conn:
        return await repo.list_attempts(conn, delivery_id)


async def job_of(pool: asyncpg.Pool, delivery_id: int) -> int:
    async with pool.acquire() as conn:
        job_id: int = await conn.fetchval(
            "SELECT outbox_job_id FROM webhook_deliveries WHERE id = $1", delivery_id)
    return job_id


async def next_attempt(ctx: dict[str, Any], pool: asyncpg.Pool, clock: FixedClock,
                       delivery_id: int) -> repo.DeliveryRow:
    """Move the pinned clock to the delivery's next attempt time, run its job once."""
    row = await delivery(pool, delivery_id)
    assert row.next_attempt_at is not None, row
    clock.set(max(clock.now(), row.next_attempt_at))
    await run_outbox_job(ctx, await job_of(pool, delivery_id))
    return await delivery(pool, delivery_id)


def stub(api: Api) -> pb_grpc.ListenerServiceStub:
    return pb_grpc.ListenerServiceStub(api.channel)


@pytest.fixture
async def hook(clock: FixedClock) -> AsyncIterator[WebhookListener]:
    server = await WebhookListener(now=lambda: int(clock.now().timestamp())).start()
    try:
        yield server
    finally:
        await server.stop()


@dataclass
class RawListener:
    """A loopback HTTP/1.1 server answering every request with a fixed status line and extra
    headers (Location, Retry-After), recording what it got."""

    status: int
    extra: dict[str, str] = field(default_factory=dict)
    received: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    port: int = 0
    _server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks/raw"

    async def start(self) -> RawListener:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                headers: dict[str, str] = {}
                while (h := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = h.decode("latin-1").partition(":")
                    headers[name.strip().lower()] = value.strip()
                await reader.readexactly(int(headers.get("content-length", "0")))
                self.received.append((line.decode("latin-1").split()[1], headers))
                extra = "".join(f"{k}: {v}\r\n" for k, v in self.extra.items())
                writer.write(f"HTTP/1.1 {self.status} X\r\n{extra}Content-Length: 0\r\n\r\n"
                             .encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


# What a listener receives.

async def test_headers_and_signature_follow_the_documented_layout(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        hook: WebhookListener) -> None:
    """Doc: Content-Type application/json; Promo-Event-Id the event's UUID (the same for every
    listener); Promo-Event-Type the number; Promo-Timestamp Unix seconds when signed;
    Promo-Signature v1=<hex> of HMAC-SHA256(secret, timestamp + "." + raw body);
    Promo-Delivery-Id / Promo-Delivery-Attempt; User-Agent promo-engine-webhooks/1."""
    second = await WebhookListener(now=lambda: int(clock.now().timestamp())).start()
    try:
        await add_listener(pool, hook.url, now=clock.now())
        await add_listener(pool, second.url, now=clock.now())
        emitted = await emit(pool, clock, payload={"campaign_id": "spring",
                                                   "name": "Spring reload"})
        clock.advance(timedelta(seconds=7))  # signed at the attempt, not at the event
        async with worker_ctx(settings, pool, clock) as ctx:
            for job_id in emitted.outbox_job_ids:
                await run_outbox_job(ctx, job_id)
    finally:
        await second.stop()
    [got] = hook.received
    [other] = second.received
    h = got.headers
    async with pool.acquire() as conn:
        rows = await conn.fetch("SELECT id, listener_id FROM webhook_deliveries ORDER BY id")
        body = await repo.get_event_body(conn, rows[0]["id"])
    assert got.verify_error is None
    assert h["content-type"] == "application/json"
    assert h["promo-event-id"] == emitted.event_id == other.headers["promo-event-id"]
    assert h["promo-event-type"] == "5"
    assert h["promo-timestamp"] == str(int(clock.now().timestamp()))
    assert h["user-agent"] == "promo-engine-webhooks/1"
    assert h["promo-delivery-id"] == str(rows[0]["id"])
    assert other.headers["promo-delivery-id"] == str(rows[1]["id"])
    assert h["promo-delivery-attempt"] == "1"
    assert got.body == body.encode()
    expected = hmac.new(SECRET.encode(), h["promo-timestamp"].encode() + b"." + got.body,
                        hashlib.sha256).hexdigest()
    assert h["promo-signature"] == f"v1={expected}"
    document = json.loads(got.body)
    assert list(document) == ["event_id", "event_type", "occurred_at", "data"]
    assert document["event_type"] == 5 and document["event_id"] == emitted.event_id


async def test_registering_a_listener_does_not_replay_older_events(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """Doc: a listener receives the events emitted while it is registered and active."""
    await emit(pool, clock)
    await add_listener(pool, "http://127.0.0.1:9/late", now=clock.now())
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM webhook_deliveries") == 0


# Retries, failures and redelivery.

@pytest.mark.parametrize("status", [500, 502, 503, 504, 408, 425, 429])
async def test_retryable_answers_leave_the_delivery_pending_with_a_backoff(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock, hook: WebhookListener,
        status: int) -> None:
    hook.default = status
    await add_listener(pool, hook.url, now=clock.now())
    emitted = await emit(pool, clock)
    async with worker_ctx(settings, pool, clock) as ctx:
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
    row = await delivery(pool)
    assert (row.status.value, row.attempts, row.last_status_code) == ("PENDING", 1, status)
    assert row.next_attempt_at is not None and row.next_attempt_at > clock.now()


async def _one_attempt(raw: RawListener, settings: Settings, pool: asyncpg.Pool,
                       clock: FixedClock) -> None:
    """Register ``raw`` (started), emit one event and run its delivery job once; stop ``raw``."""
    try:
        await add_listener(pool, raw.url, now=clock.now())
        emitted = await emit(pool, clock)
        async with worker_ctx(settings, pool, clock) as ctx:
            await run_outbox_job(ctx, emitted.outbox_job_ids[0])
    finally:
        await raw.stop()


@pytest.mark.parametrize("status", [400, 401, 403, 404, 410, 422, 301, 302, 303, 307, 308])
async def test_other_answers_fail_at_once_without_retry(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock, status: int) -> None:
    """Doc: any other status (400, 401, 403, 404, 410, 3xx ...) is FAILED at once; redirects
    are not followed (the Location points at the same listener: a follow would show)."""
    raw = await RawListener(status).start()
    raw.extra = {"Location": f"http://127.0.0.1:{raw.port}/elsewhere"}
    await _one_attempt(raw, settings, pool, clock)
    row = await delivery(pool)
    assert (row.status.value, row.attempts, row.last_status_code) == ("FAILED", 1, status)
    assert row.next_attempt_at is None
    assert [path for path, _ in raw.received] == ["/hooks/raw"]
    if 300 <= status < 400:
        assert row.last_error is not None and "redirected to" in row.last_error


async def test_retry_after_is_not_honoured(settings: Settings, pool: asyncpg.Pool,
                                           clock: FixedClock) -> None:
    """Doc: a Retry-After header is not honoured; the backoff applies."""
    await _one_attempt(await RawListener(503, {"Retry-After": "3600"}).start(), settings, pool,
                       clock)
    row = await delivery(pool)
    assert row.status.value == "PENDING" and row.next_attempt_at is not None
    delay = (row.next_attempt_at - clock.now()).total_seconds()
    assert 0.5 * settings.job_retry_base_seconds <= delay <= settings.job_retry_base_seconds


async def test_backoff_is_base_times_two_to_the_attempt_capped_with_jitter(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        hook: WebhookListener) -> None:
    """Doc: PROMO_JOB_RETRY_BASE_SECONDS x 2^(attempt-1), capped at
    PROMO_WEBHOOK_RETRY_MAX_SECONDS, times 0.5-1.0."""
    tuned = settings.model_copy(update={"job_retry_base_seconds": 10.0,
                                        "webhook_retry_max_seconds": 80.0})
    hook.default = 503
    await add_listener(pool, hook.url, now=clock.now())
    emitted = await emit(pool, clock)
    delays: list[float] = []
    async with worker_ctx(tuned, pool, clock) as ctx:
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
        row = await delivery(pool)
        for _ in range(6):
            assert row.next_attempt_at is not None
            delays.append((row.next_attempt_at - clock.now()).total_seconds())
            row = await next_attempt(ctx, pool, clock, row.id)
    ceilings = [10, 20, 40, 80, 80, 80]
    assert all(0.5 * c <= d <= c for c, d in zip(ceilings, delays, strict=True)), delays
    assert len(hook.received) == 7


async def test_dead_after_thirty_attempts_by_default(settings: Settings, pool: asyncpg.Pool,
                                                      clock: FixedClock,
                                                      hook: WebhookListener) -> None:
    """Doc: a delivery is given up (DEAD) after PROMO_WEBHOOK_MAX_ATTEMPTS (default 30)."""
    assert settings.webhook_max_attempts == 30
    hook.default = 500
    await add_listener(pool, hook.url, now=clock.now())
    emitted = await emit(pool, clock)
    async with worker_ctx(settings, pool, clock) as ctx:
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
        row = await delivery(pool)
        while row.status.value == "PENDING":
            row = await next_attempt(ctx, pool, clock, row.id)
    assert (row.status.value, row.attempts) == ("DEAD", 30)
    assert row.last_error is not None and "gave up after 30 attempts" in row.last_error
    assert len(hook.received) == 30
    assert [r.headers["promo-delivery-attempt"] for r in hook.received] == [
        str(n) for n in range(1, 31)]
    assert {r.event_id for r in hook.received} == {emitted.event_id}
    assert len({r.body for r in hook.received}) == 1  # the same bytes on every attempt


async def test_attempt_limit_is_read_at_delivery_time(settings: Settings, pool: asyncpg.Pool,
                                                      clock: FixedClock,
                                                      hook: WebhookListener) -> None:
    hook.default = 503
    await add_listener(pool, hook.url, now=clock.now())
    emitted = await emit(pool, clock)
    async with worker_ctx(settings, pool, clock) as ctx:
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
        row = await next_attempt(ctx, pool, clock, (await delivery(pool)).id)
        assert row.status.value == "PENDING"
        ctx["settings"] = settings.model_copy(update={"webhook_max_attempts": 3})
        row = await next_attempt(ctx, pool, clock, row.id)
    assert (row.status.value, row.attempts) == ("DEAD", 3)


async def test_default_deadline_is_24_hours_after_the_event(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        hook: WebhookListener) -> None:
    """Doc: without deliver_by, given up PROMO_WEBHOOK_DEADLINE_SECONDS (24 h) after the
    event; the attempt that comes up after it is not made."""
    assert settings.webhook_deadline_seconds == 86400
    hook.default = 503
    start = clock.now()
    await add_listener(pool, hook.url, now=start)
    emitted = await emit(pool, clock)
    async with worker_ctx(settings, pool, clock) as ctx:
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
        row = await delivery(pool)
        clock.set(start + timedelta(hours=24) - timedelta(seconds=1))
        row = await next_attempt(ctx, pool, clock, row.id)
        assert row.status.value == "PENDING" and len(hook.received) == 2
        clock.set(start + timedelta(hours=24, seconds=1))
        row = await next_attempt(ctx, pool, clock, row.id)
    assert row.status.value == "DEAD"
    assert row.last_error is not None and "deadline" in row.last_error
    assert len(hook.received) == 2


async def test_deadline_setting_is_read_at_delivery_time(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        hook: WebhookListener) -> None:
    hook.default = 503
    await add_listener(pool, hook.url, now=clock.now())
    emitted = await emit(pool, clock)
    async with worker_ctx(settings, pool, clock) as ctx:
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
        ctx["settings"] = settings.model_copy(update={"webhook_deadline_seconds": 60})
        clock.advance(timedelta(seconds=61))
        row = await next_attempt(ctx, pool, clock, (await delivery(pool)).id)
    assert row.status.value == "DEAD" and len(hook.received) == 1


async def test_each_attempt_uses_the_listeners_current_url(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        hook: WebhookListener) -> None:
    """Doc: each attempt reads the listener's current URL and secret."""
    old = await WebhookListener(default=503, now=lambda: int(clock.now().timestamp())).start()
    try:
        listener_id = await add_listener(pool, old.url, now=clock.now())
        emitted = await emit(pool, clock)
        async with worker_ctx(settings, pool, clock) as ctx:
            await run_outbox_job(ctx, emitted.outbox_job_ids[0])
            new_secret = "a-brand-new-secret-0123456789"
            async with pool.acquire() as conn:
                await repo.update_listener(conn, listener_id, now=clock.now(), url=hook.url,
                                           secret=new_secret)
            hook.secrets = [new_secret]
            ctx["settings"] = settings.model_copy(update={"webhook_secret_grace_seconds": 0})
            row = await next_attempt(ctx, pool, clock, (await delivery(pool)).id)
    finally:
        await old.stop()
    assert row.status.value == "DELIVERED"
    assert [a.url for a in await attempts_of(pool, row.id)] == [old.url, hook.url]
    [got] = hook.received
    assert got.verify_error is None and got.headers["promo-signature"].count("v1=") == 1


async def test_in_flight_next_attempt_time_is_the_end_of_the_lease(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        hook: WebhookListener) -> None:
    """Doc: while an attempt is in flight its next_attempt_time is the end of its lease."""
    hook.answer("hang")
    await add_listener(pool, hook.url, now=clock.now())
    emitted = await emit(pool, clock)
    async with worker_ctx(settings, pool, clock) as ctx:
        task = asyncio.create_task(run_outbox_job(ctx, emitted.outbox_job_ids[0]))
        await asyncio.wait_for(hook.hung.wait(), 5)
        row = await delivery(pool)
        assert row.status.value == "PENDING"
        assert row.next_attempt_at == clock.now() + timedelta(seconds=settings.job_lease_seconds)
        [attempt] = await attempts_of(pool, row.id)
        assert attempt.finished_at is None
        hook.release.set()
        assert await asyncio.wait_for(task, 5) == "done"
    assert (await delivery(pool)).status.value == "DELIVERED"


async def test_the_timeout_is_at_most_half_the_lease(settings: Settings, pool: asyncpg.Pool,
                                                     clock: FixedClock,
                                                     hook: WebhookListener) -> None:
    """Doc: the timeout bounds the whole exchange and is at most half of
    PROMO_JOB_LEASE_SECONDS; a timeout is retried."""
    tuned = settings.model_copy(update={"job_lease_seconds": 5, "webhook_timeout_seconds": 10})
    hook.answer((4.0, 200))
    await add_listener(pool, hook.url, now=clock.now())
    emitted = await emit(pool, clock)
    async with worker_ctx(tuned, pool, clock) as ctx:
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
    row = await delivery(pool)
    assert row.status.value == "PENDING" and row.last_status_code is None
    assert row.last_error is not None and row.last_error.startswith("timeout after 2.5 s")


# Secret rotation through the API.

async def test_rotation_signs_new_secret_first_then_only_the_new_after_the_grace(
        api: Api, settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        hook: WebhookListener) -> None:
    """Doc: secret in the mask with an empty value generates a new one; the previous secret
    keeps signing for PROMO_WEBHOOK_SECRET_GRACE_SECONDS; Promo-Signature is
    "v1=<hex>, v1=<hex>" with the new secret first."""
    created = await stub(api).RegisterListener(pb.RegisterListenerRequest(
        request_id="reg", listener=pb.Listener(event_type=SCHEDULED, url=hook.url,
                                               secret=SECRET)), metadata=api.key())
    rotated_at = clock.now()
    rotated = await stub(api).UpdateListener(pb.UpdateListenerRequest(
        request_id="rot", listener=pb.Listener(listener_id=created.listener.listener_id),
        update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=api.key())
    new = rotated.generated_secret
    assert len(new) == 43
    hook.secrets = [new]
    tuned = settings.model_copy(update={"webhook_secret_grace_seconds": 3600})
    async with worker_ctx(tuned, pool, clock) as ctx:
        clock.set(rotated_at + timedelta(seconds=3599))
        first = await emit(pool, clock)
        await run_outbox_job(ctx, first.outbox_job_ids[0])
        clock.set(rotated_at + timedelta(seconds=3601))
        second = await emit(pool, clock)
        await run_outbox_job(ctx, second.outbox_job_ids[0])
    during, after = hook.received
    ts = int(during.headers["promo-timestamp"])
    assert during.headers["promo-signature"] == (
        f"v1={sign(new, ts, during.body)}, v1={sign(SECRET, ts, during.body)}")
    ts = int(after.headers["promo-timestamp"])
    assert after.headers["promo-signature"] == f"v1={sign(new, ts, after.body)}"
    assert during.verify_error is None and after.verify_error is None


# Redelivery.

async def test_redelivery_gets_a_fresh_deadline_and_attempt_budget(
        api: Api, settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        hook: WebhookListener) -> None:
    """Doc: RedeliverEvent starts a new run of a DEAD delivery: a fresh attempt budget and a
    fresh deadline (PROMO_WEBHOOK_DEADLINE_SECONDS from now, even if the event had its own
    deliver_by), the same event id and body."""
    tuned = settings.model_copy(update={"webhook_max_attempts": 2})
    hook.default = 503
    start = clock.now()
    await add_listener(pool, hook.url, now=start)
    emitted = await emit(pool, clock, deliver_by=start + timedelta(minutes=10))
    async with worker_ctx(tuned, pool, clock) as ctx:
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
        row = await next_attempt(ctx, pool, clock, (await delivery(pool)).id)
        assert (row.status.value, row.attempts) == ("DEAD", 2)
        clock.set(start + timedelta(hours=1))  # long past deliver_by
        again = await stub(api).RedeliverEvent(pb.RedeliverEventRequest(
            request_id="again", delivery_id=row.id), metadata=api.key())
        assert again.delivery.status == pb.DELIVERY_STATUS_PENDING
        await run_outbox_job(ctx, await job_of(pool, row.id))
        row = await delivery(pool, row.id)
        assert (row.status.value, row.attempts) == ("PENDING", 3)  # sent, not dead at once
        row = await next_attempt(ctx, pool, clock, row.id)
    assert (row.status.value, row.attempts) == ("DEAD", 4)
    assert len(hook.received) == 4
    assert {r.event_id for r in hook.received} == {emitted.event_id}
    assert len({r.body for r in hook.received}) == 1


async def test_redelivery_of_delivered_and_cancelled_and_refusals(
        api: Api, settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        hook: WebhookListener) -> None:
    """Doc: redelivering a DELIVERED (or CANCELLED) delivery is allowed; one whose listener is
    inactive is FAILED_PRECONDITION / LISTENER_INACTIVE."""
    listener_id = await add_listener(pool, hook.url, now=clock.now())
    emitted = await emit(pool, clock)
    async with worker_ctx(settings, pool, clock) as ctx:
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
        row = await delivery(pool)
        assert row.status.value == "DELIVERED"
        await stub(api).RedeliverEvent(pb.RedeliverEventRequest(
            request_id="d1", delivery_id=row.id), metadata=api.key())
        await run_outbox_job(ctx, await job_of(pool, row.id))
        assert (await delivery(pool, row.id)).status.value == "DELIVERED"
        assert len(hook.received) == 2

        await stub(api).UpdateListener(pb.UpdateListenerRequest(
            request_id="off", listener=pb.Listener(listener_id=listener_id, active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["active"])), metadata=api.key())
        with pytest.raises(grpc.RpcError) as err:
            await stub(api).RedeliverEvent(pb.RedeliverEventRequest(
                request_id="d2", delivery_id=row.id), metadata=api.key())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert rpc_error_reason(err.value) == "LISTENER_INACTIVE"

        cancelled = await emit(pool, clock)  # no delivery: the listener is inactive
        assert cancelled.outbox_job_ids == []
        await stub(api).UpdateListener(pb.UpdateListenerRequest(
            request_id="on", listener=pb.Listener(listener_id=listener_id, active=True),
            update_mask=field_mask_pb2.FieldMask(paths=["active"])), metadata=api.key())
        third = await emit(pool, clock)
        await stub(api).UpdateListener(pb.UpdateListenerRequest(
            request_id="off2", listener=pb.Listener(listener_id=listener_id, active=False),
            update_mask=field_mask_pb2.FieldMask(paths=["active"])), metadata=api.key())
        await run_outbox_job(ctx, third.outbox_job_ids[0])
        row3 = await delivery(pool)
        assert row3.status.value == "CANCELLED" and len(hook.received) == 2  # no request
        await stub(api).UpdateListener(pb.UpdateListenerRequest(
            request_id="on2", listener=pb.Listener(listener_id=listener_id, active=True),
            update_mask=field_mask_pb2.FieldMask(paths=["active"])), metadata=api.key())
        await stub(api).RedeliverEvent(pb.RedeliverEventRequest(
            request_id="d3", delivery_id=row3.id), metadata=api.key())
        await run_outbox_job(ctx, await job_of(pool, row3.id))
    assert (await delivery(pool, row3.id)).status.value == "DELIVERED"
    assert hook.received[-1].event_id == third.event_id


# The scheduled-campaign event (seed 001).

async def test_scheduled_campaign_event_30_minutes_before_and_dead_at_execution(
        api: Api, settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        hook: WebhookListener) -> None:
    """Doc: type 5 is emitted PROMO_CLEARANCE_LEAD_SECONDS (30 min) before a conditional
    campaign runs, with data campaign_id, name, promotion_codes, clearance_required_by,
    target_count; deliver_by = the execution time, after which it is not delivered."""
    await stub(api).RegisterListener(pb.RegisterListenerRequest(
        request_id="reg", listener=pb.Listener(event_type=SCHEDULED, url=hook.url,
                                               secret=SECRET)), metadata=api.key())
    await reward_type(api)
    await promotion(api)
    execute_at = clock.now() + timedelta(hours=2)
    await create_campaign(api, "spring", execute_at, customers=["c-1", "c-2", "c-3"])
    async with pool.acquire() as conn:
        notify = await conn.fetchrow(
            "SELECT id, due_at FROM outbox_jobs WHERE kind = 'campaign.notify'")
    assert notify["due_at"] == execute_at - timedelta(minutes=30)
    hook.default = 503
    async with worker_ctx(settings, pool, clock) as ctx:
        clock.set(notify["due_at"])
        assert await run_outbox_job(ctx, notify["id"]) == "done"
        row = await delivery(pool)
        assert row.deliver_by == execute_at
        await run_outbox_job(ctx, await job_of(pool, row.id))
        clock.set(execute_at)
        row = await next_attempt(ctx, pool, clock, row.id)
    assert row.status.value == "DEAD" and len(hook.received) == 1
    data = json.loads(hook.received[0].body)["data"]
    assert data == {"campaign_id": "spring", "name": "Campaign spring",
                    "promotion_codes": ["VIP25"],
                    "clearance_required_by": execute_at.isoformat(), "target_count": 3}
    occurred = json.loads(hook.received[0].body)["occurred_at"]
    assert datetime.fromisoformat(occurred) == execute_at - timedelta(minutes=30)


# Registration rules (ListenerService).

async def _register_error(api: Api, listener: pb.Listener) -> tuple[grpc.StatusCode, str | None]:
    with pytest.raises(grpc.RpcError) as err:
        await stub(api).RegisterListener(pb.RegisterListenerRequest(
            request_id="bad", listener=listener), metadata=api.key())
    return err.value.code(), rpc_error_reason(err.value)


async def test_registration_limits_at_their_boundaries(api: Api) -> None:
    """Doc: url at most 2,048 characters; secret 16-256 printable characters; description at
    most 2,000 characters."""
    base = "https://hooks.example.com/"
    ok = [
        pb.Listener(event_type=SCHEDULED, url=base + "a" * (2048 - len(base))),
        pb.Listener(event_type=SCHEDULED, url=base + "x", secret="s" * 16),
        pb.Listener(event_type=SCHEDULED, url=base + "y", secret="é" * 256),
        pb.Listener(event_type=SCHEDULED, url=base + "z", secret="with spaces inside ok",
                    description="d" * 2000),
    ]
    for n, listener in enumerate(ok):
        await stub(api).RegisterListener(pb.RegisterListenerRequest(
            request_id=f"ok-{n}", listener=listener), metadata=api.key())
    bad = [
        (pb.Listener(event_type=SCHEDULED, url=base + "a" * (2049 - len(base))), "INVALID_URL"),
        (pb.Listener(event_type=SCHEDULED, url=base, secret="s" * 15), "INVALID_SECRET"),
        (pb.Listener(event_type=SCHEDULED, url=base, secret="s" * 257), "INVALID_SECRET"),
        (pb.Listener(event_type=SCHEDULED, url=base, secret="bell\x07-0123456789abc"),
         "INVALID_SECRET"),
        (pb.Listener(event_type=SCHEDULED, url=base, description="a\x00b"),
         "INVALID_DESCRIPTION"),
    ]
    for listener, reason in bad:
        assert await _register_error(api, listener) == (grpc.StatusCode.INVALID_ARGUMENT, reason)


@pytest.mark.parametrize("address", [
    "ops@[127.0.0.1]", "ops@127.0.0.1", '"ops"@example.com', "root@localhost",
    "Ops <ops@example.com>",
    "o" * 64 + "@" + "d" * 60 + "." + "e" * 60 + "." + "f" * 63 + ".xcom",  # 255 characters
])
async def test_email_addresses_refused_before_the_smtp_check(api: Api, address: str) -> None:
    """Doc: no IP-literal or dotless domains, quoted local parts, display names, at most 254
    characters; these checks come before EMAIL_NOT_CONFIGURED."""
    listener = pb.Listener(event_type=SCHEDULED, channel=pb.LISTENER_CHANNEL_EMAIL,
                           email_recipients=[address])
    assert await _register_error(api, listener) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                    "INVALID_EMAIL")


async def test_a_valid_email_listener_without_smtp_is_email_not_configured(api: Api) -> None:
    longest = "o" * 64 + "@" + "d" * 60 + "." + "e" * 60 + "." + "f" * 63 + ".com"
    assert len(longest) == 254
    listener = pb.Listener(event_type=SCHEDULED, channel=pb.LISTENER_CHANNEL_EMAIL,
                           email_recipients=[longest])
    assert await _register_error(api, listener) == (grpc.StatusCode.FAILED_PRECONDITION,
                                                    "EMAIL_NOT_CONFIGURED")


async def test_naming_an_email_field_on_a_webhook_is_wrong_channel(api: Api) -> None:
    """Doc: naming a field of the other channel in update_mask is FAILED_PRECONDITION /
    WRONG_CHANNEL (whatever value the request carries for it)."""
    created = await stub(api).RegisterListener(pb.RegisterListenerRequest(
        request_id="reg", listener=pb.Listener(event_type=SCHEDULED,
                                               url="https://hooks.example.com/a")),
        metadata=api.key())
    with pytest.raises(grpc.RpcError) as err:
        await stub(api).UpdateListener(pb.UpdateListenerRequest(
            request_id="u", listener=pb.Listener(listener_id=created.listener.listener_id),
            update_mask=field_mask_pb2.FieldMask(paths=["email_recipients"])),
            metadata=api.key())
    assert (err.value.code(), rpc_error_reason(err.value)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "WRONG_CHANNEL")


async def test_unregister_keeps_history_and_redelivery_is_listener_not_found(
        api: Api, settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        hook: WebhookListener) -> None:
    """Doc: UnregisterListener makes pending deliveries CANCELLED; a delivery whose listener
    is unregistered is refused (LISTENER_UNREGISTERED); the worker makes no request."""
    listener_id = await add_listener(pool, hook.url, now=clock.now())
    emitted = await emit(pool, clock)
    gone = await stub(api).UnregisterListener(pb.UnregisterListenerRequest(
        request_id="del", listener_id=listener_id), metadata=api.key())
    assert gone.cancelled_deliveries == 1
    async with worker_ctx(settings, pool, clock) as ctx:
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
    row = await delivery(pool)
    assert row.status.value == "CANCELLED" and hook.received == []
    detail = await stub(api).GetDelivery(pb.GetDeliveryRequest(delivery_id=row.id),
                                         metadata=api.key())
    assert detail.delivery.status == pb.DELIVERY_STATUS_CANCELLED
    assert emitted.event_id in detail.event_body


@pytest.fixture
async def mail_api(settings: Settings, pool: asyncpg.Pool,
                   clock: FixedClock) -> AsyncIterator[Api]:
    """A real server whose settings name an SMTP relay (e-mail listeners are allowed; nothing
    is sent here)."""
    mail = settings.model_copy(update={"smtp_host": "127.0.0.1", "smtp_port": 2525,
                                       "smtp_from": "alerts@promo.example.com",
                                       "smtp_starttls": False})
    async with serving_api(mail, pool, clock) as running:
        yield running


async def test_naming_url_on_an_email_listener_is_wrong_channel(mail_api: Api) -> None:
    """Doc: naming a field of the other channel in update_mask is FAILED_PRECONDITION /
    WRONG_CHANNEL (the request carries no url: nothing to validate as a URL)."""
    created = await stub(mail_api).RegisterListener(pb.RegisterListenerRequest(
        request_id="reg", listener=pb.Listener(event_type=SCHEDULED,
                                               channel=pb.LISTENER_CHANNEL_EMAIL,
                                               email_recipients=["ops@example.com"])),
        metadata=mail_api.key())
    with pytest.raises(grpc.RpcError) as err:
        await stub(mail_api).UpdateListener(pb.UpdateListenerRequest(
            request_id="u", listener=pb.Listener(listener_id=created.listener.listener_id),
            update_mask=field_mask_pb2.FieldMask(paths=["url"])), metadata=mail_api.key())
    assert (err.value.code(), rpc_error_reason(err.value)) == (
        grpc.StatusCode.FAILED_PRECONDITION, "WRONG_CHANNEL")


async def test_reusing_a_request_id_for_a_different_request_is_refused(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """Doc: reusing a request_id for a different request is REQUEST_ID_REUSED (also when only
    the chosen secret differs: it enters the fingerprint through scrypt)."""
    first = pb.Listener(event_type=SCHEDULED, url="https://hooks.example.com/a",
                        secret="first-secret-0123456789")
    created = await stub(api).RegisterListener(pb.RegisterListenerRequest(
        request_id="same", listener=first), metadata=api.key())
    again = await stub(api).RegisterListener(pb.RegisterListenerRequest(
        request_id="same", listener=first), metadata=api.key())
    assert again == created
    other = pb.Listener(event_type=SCHEDULED, url="https://hooks.example.com/a",
                        secret="other-secret-0123456789")
    with pytest.raises(grpc.RpcError) as err:
        await stub(api).RegisterListener(pb.RegisterListenerRequest(
            request_id="same", listener=other), metadata=api.key())
    assert (err.value.code(), rpc_error_reason(err.value)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "REQUEST_ID_REUSED")
    listener_id = created.listener.listener_id
    await stub(api).UpdateListener(pb.UpdateListenerRequest(
        request_id="upd", listener=pb.Listener(listener_id=listener_id,
                                               secret="rotated-secret-0123456789"),
        update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=api.key())
    with pytest.raises(grpc.RpcError) as err:
        await stub(api).UpdateListener(pb.UpdateListenerRequest(
            request_id="upd", listener=pb.Listener(listener_id=listener_id,
                                                   secret="another-secret-0123456789"),
            update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=api.key())
    assert rpc_error_reason(err.value) == "REQUEST_ID_REUSED"
    listed = await stub(api).ListListeners(pb.ListListenersRequest(), metadata=api.key())
    assert len(listed.listeners) == 1
