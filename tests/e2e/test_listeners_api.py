"""ListenerService through a real server: registration and secrets, updates, unregistering,
the delivery log with paging and filters, redelivery through a real worker to a real listener,
e-mail listeners (registration, updates, a redelivered alert through a real SMTP server), and
every bad input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest
from google.protobuf import field_mask_pb2
from grpc import aio

from config.settings import Settings
from core.clock import FixedClock
from core.events import EventType
from promo.v1 import listeners_pb2 as pb
from promo.v1 import listeners_pb2_grpc as pb_grpc
from server.app import Dependencies, start_server
from storage import webhooks as repo
from tests.conftest import Api, rpc_error_reason
from tests.integration.test_email_delivery import Relay, smtp_server
from tests.integration.test_webhook_delivery import (
    SECRET,
    WebhookListener,
    running_worker,
    wait_until,
)
from tests.webhook_listener import free_port
from workers.outbox import sweep_once

SCHEDULED = pb.EVENT_TYPE_SCHEDULED_CAMPAIGN
EMAIL = pb.LISTENER_CHANNEL_EMAIL
ALERTS = ["ops@example.com", "crm-team@example.org"]


def _stub(api: Api) -> pb_grpc.ListenerServiceStub:
    return pb_grpc.ListenerServiceStub(api.channel)


async def _register(api: Api, url: str = "https://hooks.example.com/promo", *,
                    request_id: str = "r1", event_type: int = SCHEDULED, secret: str = SECRET,
                    active: bool | None = None, description: str = "") -> pb.Listener:
    listener = pb.Listener(event_type=event_type, url=url,  # type: ignore[arg-type]
                           secret=secret, description=description)
    if active is not None:
        listener.active = active
    response = await _stub(api).RegisterListener(
        pb.RegisterListenerRequest(request_id=request_id, listener=listener), metadata=api.key())
    return response.listener


async def _emit(pool: asyncpg.Pool, clock: FixedClock, count: int = 1,
                event_type: EventType = EventType.SCHEDULED_CAMPAIGN) -> list[str]:
    ids = []
    async with pool.acquire() as conn, conn.transaction():
        for i in range(count):
            emitted = await repo.emit_event(conn, event_type=event_type, now=clock.now(),
                                            payload={"campaign_id": f"c{i}"})
            assert emitted is not None
            ids.append(emitted.event_id)
    return ids


async def test_register_generates_a_secret_shown_once(api: Api) -> None:
    stub = _stub(api)
    request = pb.RegisterListenerRequest(request_id="gen", listener=pb.Listener(
        event_type=SCHEDULED, url="https://hooks.example.com/a", description="compliance"))
    first = await stub.RegisterListener(request, metadata=api.key())
    assert len(first.generated_secret) == 43  # 32 random bytes, URL-safe base64
    assert first.listener.listener_id > 0 and first.listener.active  # unset active: true
    assert first.listener.secret == "" and first.listener.description == "compliance"
    assert first.listener.event_type == SCHEDULED
    again = await stub.RegisterListener(request, metadata=api.key())  # a retry: same answer
    assert again == first
    got = await stub.GetListener(pb.GetListenerRequest(listener_id=first.listener.listener_id),
                                 metadata=api.key())
    assert got.listener == first.listener and got.listener.secret == ""
    listed = await stub.ListListeners(pb.ListListenersRequest(), metadata=api.key())
    assert [x.listener_id for x in listed.listeners] == [first.listener.listener_id]
    assert all(not x.secret for x in listed.listeners)

    given = await stub.RegisterListener(pb.RegisterListenerRequest(
        request_id="given", listener=pb.Listener(event_type=SCHEDULED, url="http://h/b",
                                                 secret=SECRET, active=False)),
        metadata=api.key())
    assert given.generated_secret == "" and not given.listener.active


def test_proto_event_types_match_the_core() -> None:
    names = {v.name: v.number for v in pb.EventType.DESCRIPTOR.values}
    assert names.pop("EVENT_TYPE_UNSPECIFIED") == 0
    assert names == {f"EVENT_TYPE_{t.name}": t.value for t in EventType}
    assert pb.EVENT_TYPE_SCHEDULED_CAMPAIGN == 5


async def test_update_listener_fields_and_rotate_the_secret(api: Api,
                                                            clock: FixedClock) -> None:
    stub = _stub(api)
    created = await _register(api)
    clock.advance(timedelta(minutes=5))
    updated = await stub.UpdateListener(pb.UpdateListenerRequest(
        request_id="u1",
        listener=pb.Listener(listener_id=created.listener_id, url="http://new.example/x",
                             active=False, description="paused",
                             event_type=pb.EVENT_TYPE_BONUS_ISSUED),
        update_mask=field_mask_pb2.FieldMask(paths=["url", "active", "description"])),
        metadata=api.key())
    assert (updated.listener.url, updated.listener.active, updated.listener.description) == (
        "http://new.example/x", False, "paused")
    assert updated.listener.event_type == SCHEDULED  # not in the mask: unchanged
    assert updated.generated_secret == "" and not updated.listener.HasField("secret_rotate_time")
    assert updated.listener.update_time.ToDatetime() > created.update_time.ToDatetime()

    rotated = await stub.UpdateListener(pb.UpdateListenerRequest(
        request_id="u2", listener=pb.Listener(listener_id=created.listener_id),
        update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=api.key())
    assert len(rotated.generated_secret) == 43
    assert rotated.listener.secret_rotate_time.ToDatetime(tzinfo=clock.now().tzinfo) == \
        clock.now()
    chosen = await stub.UpdateListener(pb.UpdateListenerRequest(
        request_id="u3", listener=pb.Listener(listener_id=created.listener_id,
                                              secret="a-chosen-secret-of-enough-length"),
        update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=api.key())
    assert chosen.generated_secret == ""


@pytest.mark.parametrize(("paths", "reason", "fragment"), [
    ([], "EMPTY_UPDATE_MASK", "at least one field"),
    (["event_type"], "INVALID_UPDATE_MASK", "register a new listener"),
    (["listener_id", "url"], "INVALID_UPDATE_MASK", "cannot be updated: listener_id"),
])
async def test_update_mask_is_checked(api: Api, paths: list[str], reason: str,
                                      fragment: str) -> None:
    created = await _register(api)
    with pytest.raises(grpc.RpcError) as err:
        await _stub(api).UpdateListener(pb.UpdateListenerRequest(
            request_id="u", listener=pb.Listener(listener_id=created.listener_id, url="http://x"),
            update_mask=field_mask_pb2.FieldMask(paths=paths)), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == reason
    assert fragment in (err.value.details() or "")


@pytest.mark.parametrize(("listener", "request_id", "reason", "fragment"), [
    (pb.Listener(event_type=SCHEDULED, url="ftp://h/x"), "r", "INVALID_URL", "http or https"),
    (pb.Listener(event_type=SCHEDULED, url="javascript:alert(1)"), "r", "INVALID_URL",
     "http or https"),
    (pb.Listener(event_type=SCHEDULED, url="file:///etc/passwd"), "r", "INVALID_URL",
     "http or https"),
    (pb.Listener(event_type=SCHEDULED, url="hooks.example.com/x"), "r", "INVALID_URL",
     "http or https"),
    (pb.Listener(event_type=SCHEDULED, url=""), "r", "INVALID_URL", "url is required"),
    (pb.Listener(event_type=SCHEDULED, url="https://user:pw@h/x"), "r", "INVALID_URL",
     "user name or password"),
    (pb.Listener(event_type=SCHEDULED, url="https://h/x#frag"), "r", "INVALID_URL",
     "fragment"),
    (pb.Listener(event_type=SCHEDULED, url="https:///x"), "r", "INVALID_URL", "name a host"),
    (pb.Listener(event_type=SCHEDULED, url="https://h:99999/x"), "r", "INVALID_URL",
     "not a valid URL"),
    (pb.Listener(event_type=SCHEDULED, url="https://h/a b"), "r", "INVALID_URL", "spaces"),
    (pb.Listener(url="https://h/x"), "r", "INVALID_EVENT_TYPE", "event_type is required"),
    (pb.Listener(event_type=7, url="https://h/x"), "r",  # type: ignore[arg-type]
     "INVALID_EVENT_TYPE", "7 is not an event type"),
    (pb.Listener(event_type=SCHEDULED, url="https://h/x", secret="short"), "r",
     "INVALID_SECRET", "16-256 characters"),
    (pb.Listener(event_type=SCHEDULED, url="https://h/x", description="d" * 2001), "r",
     "INVALID_DESCRIPTION", "at most 2000"),
    (pb.Listener(event_type=SCHEDULED, url="https://h/x"), "", "INVALID_REQUEST_ID",
     "request_id is required"),
    (pb.Listener(event_type=SCHEDULED, url="https://h/x", channel=9), "r",  # type: ignore
     "INVALID_CHANNEL", "9 is not a listener channel"),
    (pb.Listener(event_type=SCHEDULED, url="https://h/x", email_recipients=ALERTS), "r",
     "INVALID_EMAIL", "email_recipients is for e-mail listeners"),
    # E-mail listeners: checked before the server's SMTP settings are (these have none).
    (pb.Listener(event_type=SCHEDULED, channel=EMAIL), "r", "INVALID_EMAIL",
     "must list 1-20 addresses, got 0"),
    (pb.Listener(event_type=SCHEDULED, channel=EMAIL,
                 email_recipients=[f"a{i}@example.com" for i in range(21)]), "r",
     "INVALID_EMAIL", "must list 1-20 addresses, got 21"),
    (pb.Listener(event_type=SCHEDULED, channel=EMAIL, email_recipients=["ops@example"]), "r",
     "INVALID_EMAIL", "needs a domain with a dot"),
    (pb.Listener(event_type=SCHEDULED, channel=EMAIL, email_recipients=["Ops <ops@x.com>"]),
     "r", "INVALID_EMAIL", "without spaces"),
    (pb.Listener(event_type=SCHEDULED, channel=EMAIL,
                 email_recipients=["ops@example.com\r\nBcc: thief@evil.example"]), "r",
     "INVALID_EMAIL", "listener.email_recipients[0]"),
    (pb.Listener(event_type=SCHEDULED, channel=EMAIL, email_recipients=["ops.example.com"]),
     "r", "INVALID_EMAIL", "is not an e-mail address"),
    (pb.Listener(event_type=SCHEDULED, channel=EMAIL,
                 email_recipients=["ops@example.com", "OPS@Example.com"]), "r",
     "INVALID_EMAIL", "listed twice"),
    (pb.Listener(event_type=SCHEDULED, channel=EMAIL, email_recipients=ALERTS,
                 url="https://h/x"), "r", "INVALID_URL", "an e-mail listener has"),
    (pb.Listener(event_type=SCHEDULED, channel=EMAIL, email_recipients=ALERTS,
                 secret=SECRET), "r", "INVALID_SECRET", "e-mails are not signed"),
])
async def test_bad_registration_is_invalid_argument_and_writes_nothing(
        api: Api, listener: pb.Listener, request_id: str, reason: str, fragment: str) -> None:
    stub = _stub(api)
    with pytest.raises(grpc.RpcError) as err:
        await stub.RegisterListener(pb.RegisterListenerRequest(request_id=request_id,
                                                               listener=listener),
                                    metadata=api.key())
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert rpc_error_reason(err.value) == reason
    assert fragment in (err.value.details() or "")
    listed = await stub.ListListeners(pb.ListListenersRequest(), metadata=api.key())
    assert list(listed.listeners) == []


async def test_unknown_ids_are_not_found_and_missing_ids_invalid(api: Api) -> None:
    stub = _stub(api)
    calls = [
        (stub.GetListener(pb.GetListenerRequest(listener_id=999), metadata=api.key()),
         "LISTENER_NOT_FOUND"),
        (stub.UpdateListener(pb.UpdateListenerRequest(
            request_id="u", listener=pb.Listener(listener_id=999, description="x"),
            update_mask=field_mask_pb2.FieldMask(paths=["description"])), metadata=api.key()),
         "LISTENER_NOT_FOUND"),
        (stub.UnregisterListener(pb.UnregisterListenerRequest(request_id="d", listener_id=999),
                                 metadata=api.key()), "LISTENER_NOT_FOUND"),
        (stub.GetDelivery(pb.GetDeliveryRequest(delivery_id=999), metadata=api.key()),
         "DELIVERY_NOT_FOUND"),
        (stub.RedeliverEvent(pb.RedeliverEventRequest(request_id="x", delivery_id=999),
                             metadata=api.key()), "DELIVERY_NOT_FOUND"),
    ]
    for call, reason in calls:
        with pytest.raises(grpc.RpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert rpc_error_reason(err.value) == reason
    with pytest.raises(grpc.RpcError) as err:
        await stub.GetListener(pb.GetListenerRequest(), metadata=api.key())
    assert rpc_error_reason(err.value) == "MISSING_FIELD"
    with pytest.raises(grpc.RpcError) as err:
        await stub.UnregisterListener(pb.UnregisterListenerRequest(listener_id=1),
                                      metadata=api.key())
    assert rpc_error_reason(err.value) == "INVALID_REQUEST_ID"


async def test_list_listeners_pages_and_filters_by_event_type(api: Api) -> None:
    stub = _stub(api)
    ids = []
    for i in range(7):
        kind = SCHEDULED if i % 2 == 0 else pb.EVENT_TYPE_BONUS_ISSUED
        ids.append((await _register(api, f"https://h/{i}", request_id=f"r{i}",
                                    event_type=kind)).listener_id)
    seen: list[int] = []
    token = ""
    while True:
        page = await stub.ListListeners(pb.ListListenersRequest(
            page_size=2, page_token=token, event_type=SCHEDULED), metadata=api.key())
        seen += [x.listener_id for x in page.listeners]
        token = page.next_page_token
        if not token:
            break
    assert seen == ids[0::2]
    with pytest.raises(grpc.RpcError) as err:  # a token is bound to its filters
        await stub.ListListeners(pb.ListListenersRequest(page_size=2, page_token=(
            await stub.ListListeners(pb.ListListenersRequest(page_size=2),
                                     metadata=api.key())).next_page_token,
            event_type=SCHEDULED), metadata=api.key())
    assert rpc_error_reason(err.value) == "INVALID_PAGE_TOKEN"
    with pytest.raises(grpc.RpcError) as err:
        await stub.ListListeners(pb.ListListenersRequest(event_type=42),  # type: ignore[arg-type]
                                 metadata=api.key())
    assert rpc_error_reason(err.value) == "INVALID_EVENT_TYPE"


async def test_unregister_cancels_pending_deliveries_and_keeps_their_history(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    stub = _stub(api)
    doomed = await _register(api, "https://h/doomed", request_id="a")
    kept = await _register(api, "https://h/kept", request_id="b")
    await _emit(pool, clock, count=3)
    gone = await stub.UnregisterListener(pb.UnregisterListenerRequest(
        request_id="d", listener_id=doomed.listener_id), metadata=api.key())
    assert gone.cancelled_deliveries == 3
    replay = await stub.UnregisterListener(pb.UnregisterListenerRequest(
        request_id="d", listener_id=doomed.listener_id), metadata=api.key())
    assert replay == gone
    history = await stub.ListDeliveries(pb.ListDeliveriesRequest(
        listener_id=doomed.listener_id), metadata=api.key())
    assert [d.status for d in history.deliveries] == [pb.DELIVERY_STATUS_CANCELLED] * 3
    assert all("listener unregistered" in d.last_error for d in history.deliveries)
    others = await stub.ListDeliveries(pb.ListDeliveriesRequest(
        listener_id=kept.listener_id), metadata=api.key())
    assert [d.status for d in others.deliveries] == [pb.DELIVERY_STATUS_PENDING] * 3
    assert all(d.HasField("next_attempt_time") for d in others.deliveries)
    with pytest.raises(grpc.RpcError) as err:
        await stub.GetListener(pb.GetListenerRequest(listener_id=doomed.listener_id),
                               metadata=api.key())
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as err:
        await stub.RedeliverEvent(pb.RedeliverEventRequest(
            request_id="x", delivery_id=history.deliveries[0].delivery_id), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(err.value) == "LISTENER_UNREGISTERED"


async def test_list_deliveries_pages_newest_first_with_filters(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    stub = _stub(api)
    first = await _register(api, "https://h/1", request_id="a")
    second = await _register(api, "https://h/2", request_id="b")
    bonus = await _register(api, "https://h/3", request_id="c",
                            event_type=pb.EVENT_TYPE_BONUS_ISSUED)
    event_ids = await _emit(pool, clock, count=6)
    await _emit(pool, clock, count=2, event_type=EventType.BONUS_ISSUED)

    seen: list[int] = []
    token = ""
    pages = 0
    while True:
        page = await stub.ListDeliveries(pb.ListDeliveriesRequest(page_size=5, page_token=token),
                                         metadata=api.key())
        seen += [d.delivery_id for d in page.deliveries]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    assert len(seen) == 14 and seen == sorted(seen, reverse=True) and pages == 3

    one_event = await stub.ListDeliveries(pb.ListDeliveriesRequest(event_id=event_ids[2]),
                                          metadata=api.key())
    assert {d.listener_id for d in one_event.deliveries} == {first.listener_id,
                                                             second.listener_id}
    assert {d.event_id for d in one_event.deliveries} == {event_ids[2]}
    by_type = await stub.ListDeliveries(pb.ListDeliveriesRequest(
        event_type=pb.EVENT_TYPE_BONUS_ISSUED), metadata=api.key())
    assert {d.listener_id for d in by_type.deliveries} == {bonus.listener_id}
    assert len(by_type.deliveries) == 2
    pending = await stub.ListDeliveries(pb.ListDeliveriesRequest(
        listener_id=second.listener_id, statuses=[pb.DELIVERY_STATUS_PENDING]),
        metadata=api.key())
    assert len(pending.deliveries) == 6
    delivered = await stub.ListDeliveries(pb.ListDeliveriesRequest(
        statuses=[pb.DELIVERY_STATUS_DELIVERED]), metadata=api.key())
    assert list(delivered.deliveries) == []

    for request, reason in (
            (pb.ListDeliveriesRequest(event_id="not-a-uuid"), "INVALID_EVENT_ID"),
            (pb.ListDeliveriesRequest(statuses=[9]), "INVALID_STATUS"),  # type: ignore[list-item]
            (pb.ListDeliveriesRequest(page_size=-1), "INVALID_PAGE_SIZE"),
            (pb.ListDeliveriesRequest(page_token="garbage!"), "INVALID_PAGE_TOKEN"),
            (pb.ListDeliveriesRequest(event_type=3), "INVALID_EVENT_TYPE"),  # type: ignore
    ):
        with pytest.raises(grpc.RpcError) as err:
            await stub.ListDeliveries(request, metadata=api.key())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert rpc_error_reason(err.value) == reason


async def test_failed_delivery_is_redelivered_through_a_real_worker(
        api: Api, settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """The server and the worker share the test's pinned clock (set to the real time: arq
    defers a job until its due time), and the listener verifies with it."""
    clock.set(datetime.now(UTC))
    stub = _stub(api)
    hook = await WebhookListener(now=lambda: int(clock.now().timestamp())).start()
    try:
        hook.answer(400)
        created = await _register(api, hook.url)
        [event_id] = await _emit(pool, clock)
        assert settings.redis_url
        from arq import create_pool as create_arq_pool
        from arq.connections import RedisSettings

        redis = await create_arq_pool(RedisSettings.from_dsn(settings.redis_url))
        try:
            ctx = {"pool": pool, "redis": redis, "clock": clock, "settings": settings}

            async def status_is(value: int) -> bool:
                listed = await stub.ListDeliveries(pb.ListDeliveriesRequest(
                    event_id=event_id), metadata=api.key())
                return listed.deliveries[0].status == value

            async with running_worker(settings, clock=clock):
                assert await sweep_once(ctx) == 1
                await wait_until(lambda: status_is(pb.DELIVERY_STATUS_FAILED), what="FAILED")
                [failed] = (await stub.ListDeliveries(pb.ListDeliveriesRequest(
                    listener_id=created.listener_id), metadata=api.key())).deliveries
                assert (failed.attempt_count, failed.last_status_code) == (1, 400)
                assert failed.last_error == "HTTP 400: listener says 400"
                assert not failed.HasField("next_attempt_time")

                request = pb.RedeliverEventRequest(request_id="again",
                                                   delivery_id=failed.delivery_id)
                again = await stub.RedeliverEvent(request, metadata=api.key())
                assert again.delivery.status == pb.DELIVERY_STATUS_PENDING
                assert again.delivery.next_attempt_time.ToDatetime(
                    tzinfo=clock.now().tzinfo) == clock.now()
                with pytest.raises(grpc.RpcError) as err:  # already on its way
                    await stub.RedeliverEvent(pb.RedeliverEventRequest(
                        request_id="twice", delivery_id=failed.delivery_id), metadata=api.key())
                assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
                assert rpc_error_reason(err.value) == "DELIVERY_PENDING"
                assert await stub.RedeliverEvent(request, metadata=api.key()) == again
                assert await sweep_once(ctx) == 1
                await wait_until(lambda: status_is(pb.DELIVERY_STATUS_DELIVERED),
                                 what="DELIVERED")
        finally:
            await redis.aclose()
        detail = await stub.GetDelivery(pb.GetDeliveryRequest(delivery_id=failed.delivery_id),
                                        metadata=api.key())
        assert detail.delivery.status == pb.DELIVERY_STATUS_DELIVERED
        assert detail.delivery.attempt_count == 2 and detail.delivery.last_error == ""
        assert detail.delivery.delivered_time.ToDatetime(tzinfo=clock.now().tzinfo) == \
            clock.now()
        assert [(a.attempt, a.status_code) for a in detail.attempts] == [(1, 400), (2, 200)]
        assert all(a.url == hook.url and a.HasField("finish_time") for a in detail.attempts)
        assert f'"event_id":"{event_id}"' in detail.event_body
        assert [r.body.decode() for r in hook.received] == [detail.event_body] * 2
        assert [r.verify_error for r in hook.received] == [None, None]
    finally:
        await hook.stop()


async def test_wrong_role_is_permission_denied(api: Api) -> None:
    with pytest.raises(grpc.RpcError) as err:
        await _stub(api).ListListeners(pb.ListListenersRequest(), metadata=api.key("listener"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED


@pytest.fixture
def smtp_port() -> int:
    return free_port()


@pytest.fixture
def mail_settings(settings: Settings, smtp_port: int) -> Settings:
    return settings.model_copy(update={
        "smtp_host": "127.0.0.1", "smtp_port": smtp_port,
        "smtp_from": "alerts@promo.example.com", "smtp_starttls": False,
        "smtp_timeout_seconds": 2.0})


@pytest.fixture
async def mail_api(mail_settings: Settings, pool: asyncpg.Pool,
                   clock: FixedClock) -> AsyncIterator[Api]:
    """A real server whose settings name an SMTP relay (e-mail listeners are allowed)."""
    running = await start_server(mail_settings, Dependencies(pool=pool, clock=clock))
    channel = aio.insecure_channel(running.address)
    try:
        yield Api(channel=channel, address=running.address)
    finally:
        await channel.close()
        await running.stop(0)


async def test_email_listeners_need_the_smtp_settings(api: Api) -> None:
    stub = _stub(api)
    with pytest.raises(grpc.RpcError) as err:
        await stub.RegisterListener(pb.RegisterListenerRequest(
            request_id="mail", listener=pb.Listener(
                event_type=pb.EVENT_TYPE_CODE_POOL_THRESHOLD, channel=EMAIL,
                email_recipients=ALERTS)), metadata=api.key())
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert rpc_error_reason(err.value) == "EMAIL_NOT_CONFIGURED"
    assert "PROMO_SMTP_HOST" in (err.value.details() or "")
    listed = await stub.ListListeners(pb.ListListenersRequest(), metadata=api.key())
    assert list(listed.listeners) == []


async def test_register_and_update_an_email_listener(mail_api: Api) -> None:
    stub = _stub(mail_api)
    created = await stub.RegisterListener(pb.RegisterListenerRequest(
        request_id="mail", listener=pb.Listener(
            event_type=pb.EVENT_TYPE_CODE_POOL_THRESHOLD, channel=EMAIL,
            email_recipients=["Ops@Example.COM", "crm-team@example.org"],
            description="pool alerts")), metadata=mail_api.key())
    listener = created.listener
    assert created.generated_secret == ""  # e-mails are not signed
    assert listener.channel == EMAIL and listener.url == ""
    assert list(listener.email_recipients) == ["Ops@example.com", "crm-team@example.org"]
    webhook = await _register(mail_api, request_id="hook")  # channel unset: a webhook
    assert webhook.channel == pb.LISTENER_CHANNEL_WEBHOOK and not webhook.email_recipients
    got = await stub.GetListener(pb.GetListenerRequest(listener_id=listener.listener_id),
                                 metadata=mail_api.key())
    assert got.listener == listener

    updated = await stub.UpdateListener(pb.UpdateListenerRequest(
        request_id="u1", listener=pb.Listener(listener_id=listener.listener_id,
                                              email_recipients=["oncall@example.net"]),
        update_mask=field_mask_pb2.FieldMask(paths=["email_recipients"])),
        metadata=mail_api.key())
    assert list(updated.listener.email_recipients) == ["oncall@example.net"]
    for paths, listener_id, reason, fragment in (
            (["url"], listener.listener_id, "WRONG_CHANNEL",
             "is an e-mail listener: it has no url"),
            (["secret"], listener.listener_id, "WRONG_CHANNEL", "it has no secret"),
            (["email_recipients"], webhook.listener_id, "WRONG_CHANNEL",
             "it has no email_recipients")):
        with pytest.raises(grpc.RpcError) as err:
            await stub.UpdateListener(pb.UpdateListenerRequest(
                request_id=f"bad-{paths[0]}-{listener_id}", listener=pb.Listener(
                    listener_id=listener_id, url="https://h/x", email_recipients=ALERTS),
                update_mask=field_mask_pb2.FieldMask(paths=paths)), metadata=mail_api.key())
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert rpc_error_reason(err.value) == reason
        assert fragment in (err.value.details() or "")
    for paths, reason, fragment in ((["channel"], "INVALID_UPDATE_MASK", "channel never change"),
                                    (["email_recipients"], "INVALID_EMAIL", "got 0")):
        with pytest.raises(grpc.RpcError) as err:
            await stub.UpdateListener(pb.UpdateListenerRequest(
                request_id="bad", listener=pb.Listener(listener_id=listener.listener_id),
                update_mask=field_mask_pb2.FieldMask(paths=paths)), metadata=mail_api.key())
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert rpc_error_reason(err.value) == reason
        assert fragment in (err.value.details() or "")
    again = await stub.GetListener(pb.GetListenerRequest(listener_id=listener.listener_id),
                                   metadata=mail_api.key())
    assert list(again.listener.email_recipients) == ["oncall@example.net"]


async def test_a_refused_alert_is_redelivered_by_email(
        mail_api: Api, mail_settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        smtp_port: int) -> None:
    """FAILED on a 5xx, then RedeliverEvent: a new run through a real worker and a real SMTP
    server; the log shows both attempts with the relay's reply codes."""
    clock.set(datetime.now(UTC))
    stub = _stub(mail_api)
    relay = Relay()
    relay.data_replies.append("550 5.7.1 Relaying denied")
    created = (await stub.RegisterListener(pb.RegisterListenerRequest(
        request_id="mail", listener=pb.Listener(event_type=SCHEDULED, channel=EMAIL,
                                                email_recipients=ALERTS)),
        metadata=mail_api.key())).listener
    [event_id] = await _emit(pool, clock)
    assert mail_settings.redis_url
    from arq import create_pool as create_arq_pool
    from arq.connections import RedisSettings

    redis = await create_arq_pool(RedisSettings.from_dsn(mail_settings.redis_url))
    ctx = {"pool": pool, "redis": redis, "clock": clock, "settings": mail_settings}

    async def status_is(value: int) -> bool:
        listed = await stub.ListDeliveries(pb.ListDeliveriesRequest(event_id=event_id),
                                           metadata=mail_api.key())
        return listed.deliveries[0].status == value

    try:
        with smtp_server(relay, smtp_port):
            async with running_worker(mail_settings, clock=clock):
                assert await sweep_once(ctx) == 1
                await wait_until(lambda: status_is(pb.DELIVERY_STATUS_FAILED), what="FAILED")
                [failed] = (await stub.ListDeliveries(pb.ListDeliveriesRequest(
                    listener_id=created.listener_id), metadata=mail_api.key())).deliveries
                assert (failed.attempt_count, failed.last_status_code) == (1, 550)
                assert failed.last_error == "SMTP 550: 5.7.1 Relaying denied"
                await stub.RedeliverEvent(pb.RedeliverEventRequest(
                    request_id="again", delivery_id=failed.delivery_id), metadata=mail_api.key())
                assert await sweep_once(ctx) == 1
                await wait_until(lambda: status_is(pb.DELIVERY_STATUS_DELIVERED),
                                 what="DELIVERED")
    finally:
        await redis.aclose()
    detail = await stub.GetDelivery(pb.GetDeliveryRequest(delivery_id=failed.delivery_id),
                                    metadata=mail_api.key())
    assert [(a.attempt, a.status_code) for a in detail.attempts] == [(1, 550), (2, 250)]
    assert {a.url for a in detail.attempts} == {"mailto:" + ",".join(ALERTS)}
    [accepted] = relay.accepted
    assert accepted.rcpt_tos == ALERTS and accepted.message["Promo-Event-Id"] == event_id
    assert accepted.message["Subject"] == "[promo] Campaign awaiting clearance: c0"
