"""ListenerService: listeners (webhook or e-mail) and their delivery log, a thin layer over
storage.webhooks.

Secrets are write-only: a generated one is returned once (in the Register/Update response, and
so also to a retry with the same request_id, which replays that response); no read returns one.
They are stored sealed with the server's secret box (core/secret_box.py) when a key is
configured, in clear otherwise; only the worker opens them, to sign. The stored answer that a
retry replays is sealed too (its generated_secret), so the secret is in clear in no table, and
a caller-chosen secret enters the request's fingerprint only through scrypt
(server/secret_fingerprint.py), so that table does not allow testing guesses of it cheaply.
E-mail listeners have recipients instead of a URL and no secret; registering one needs the
server's SMTP settings (PROMO_SMTP_HOST), else FAILED_PRECONDITION.
"""

from __future__ import annotations

import logging
import secrets
import uuid

import asyncpg
from grpc import aio

from core.errors import FailedPrecondition, InvalidArgument
from core.events import (
    Channel,
    DeliveryStatus,
    EventType,
    parse_event_type,
    validate_description,
    validate_email_recipients,
    validate_listener_url,
    validate_secret,
)
from core.pagination import effective_page_size
from core.secret_box import SecretBoxError
from promo.v1 import listeners_pb2 as pb
from promo.v1 import listeners_pb2_grpc as pb_grpc
from server.convert import run_request_once, timestamp
from server.deps import Dependencies
from server.page_bytes import fit_page
from server.page_tokens import decode_page_token, encode_page_token
from server.secret_fingerprint import listener_request_fingerprints
from storage import webhooks as repo
from storage.listener_secrets import LISTENER_SECRET_PURPOSE
from storage.queue import queue_after_commit

log = logging.getLogger("promo.listeners")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["ListenerService"].full_name
ROLES = {f"/{SERVICE_NAME}/{m}": {"admin"} for m in (
    "RegisterListener", "GetListener", "ListListeners", "UpdateListener", "UnregisterListener",
    "ListDeliveries", "GetDelivery", "RedeliverEvent")}

UPDATABLE_FIELDS = frozenset({"url", "active", "description", "secret", "email_recipients"})
# Fields that belong to one channel only.
CHANNEL_FIELDS = {Channel.WEBHOOK: frozenset({"url", "secret"}),
                  Channel.EMAIL: frozenset({"email_recipients"})}
GENERATED_SECRET_BYTES = 32
# The generated secret inside a stored answer (idempotency_keys.response): another use than the
# listener's column, so neither opens in place of the other.
ANSWER_PURPOSE = b"idempotency_keys.generated_secret"

_STATUS_TO_PB = {
    DeliveryStatus.PENDING: pb.DELIVERY_STATUS_PENDING,
    DeliveryStatus.DELIVERED: pb.DELIVERY_STATUS_DELIVERED,
    DeliveryStatus.FAILED: pb.DELIVERY_STATUS_FAILED,
    DeliveryStatus.DEAD: pb.DELIVERY_STATUS_DEAD,
    DeliveryStatus.CANCELLED: pb.DELIVERY_STATUS_CANCELLED,
}
_STATUS_FROM_PB = {v: k for k, v in _STATUS_TO_PB.items()}

_CHANNEL_TO_PB = {Channel.WEBHOOK: pb.LISTENER_CHANNEL_WEBHOOK,
                  Channel.EMAIL: pb.LISTENER_CHANNEL_EMAIL}
EMAIL_DISABLED = ("e-mail listeners are not available: this server has no SMTP relay "
                  "configured (set PROMO_SMTP_HOST and PROMO_SMTP_FROM, see docs/webhooks.md)")


def generate_secret() -> str:
    """32 random bytes, URL-safe base64 (43 characters): easy to paste into any config."""
    return secrets.token_urlsafe(GENERATED_SECRET_BYTES)


def _event_type(value: int, *, field: str, required: bool) -> EventType | None:
    if value == 0:
        if required:
            raise InvalidArgument(f"{field} is required", reason="INVALID_EVENT_TYPE",
                                  metadata={"field": field})
        return None
    return parse_event_type(value, field=field)


def _channel(value: int, *, field: str) -> Channel:
    if value == 0:
        return Channel.WEBHOOK
    channel = next((c for c, number in _CHANNEL_TO_PB.items() if number == value), None)
    if channel is None:
        raise InvalidArgument(
            f"{field} {value} is not a listener channel; known channels: "
            "LISTENER_CHANNEL_WEBHOOK (1), LISTENER_CHANNEL_EMAIL (2)",
            reason="INVALID_CHANNEL", metadata={"field": field})
    return channel


def _id(value: int, field: str) -> int:
    """A listener or delivery id: 0 (unset) is MISSING_FIELD and a negative one INVALID_ID,
    as for every other id field."""
    if value == 0:
        raise InvalidArgument(f"{field} is required (a positive id)", reason="MISSING_FIELD",
                              metadata={"field": field})
    if value < 0:
        raise InvalidArgument(f"{field} must be a positive id", reason="INVALID_ID",
                              metadata={"field": field})
    return value


def listener_to_pb(row: repo.ListenerRow) -> pb.Listener:
    return pb.Listener(
        listener_id=row.id, event_type=pb.EventType.ValueType(row.event_type), url=row.url,
        active=row.active, description=row.description,
        secret_rotate_time=timestamp(row.secret_rotated_at),
        create_time=timestamp(row.create_time), update_time=timestamp(row.update_time),
        channel=_CHANNEL_TO_PB[row.channel], email_recipients=list(row.email_recipients))


def delivery_to_pb(row: repo.DeliveryRow) -> pb.Delivery:
    return pb.Delivery(
        delivery_id=row.id, event_id=row.event_id,
        event_type=pb.EventType.ValueType(row.event_type),
        listener_id=row.listener_id, status=_STATUS_TO_PB[row.status],
        attempt_count=row.attempts, last_status_code=row.last_status_code or 0,
        last_error=row.last_error or "", last_latency_ms=row.last_latency_ms or 0.0,
        next_attempt_time=timestamp(row.next_attempt_at),
        delivered_time=timestamp(row.delivered_at),
        deliver_by_time=timestamp(row.deliver_by),
        create_time=timestamp(row.create_time), update_time=timestamp(row.update_time))


def attempt_to_pb(row: repo.AttemptRow) -> pb.DeliveryAttempt:
    return pb.DeliveryAttempt(
        attempt=row.attempt, url=row.url, start_time=timestamp(row.started_at),
        finish_time=timestamp(row.finished_at), status_code=row.status_code or 0,
        error=row.error or "", latency_ms=row.latency_ms or 0.0)


def _check_channel(current: repo.ListenerRow, paths: set[str]) -> None:
    """FAILED_PRECONDITION WRONG_CHANNEL when ``paths`` (an update_mask) names a field of the
    other channel than ``current``'s."""
    foreign = sorted(paths & CHANNEL_FIELDS[Channel.WEBHOOK if current.channel
                                            is Channel.EMAIL else Channel.EMAIL])
    if foreign:
        kind = "an e-mail" if current.channel is Channel.EMAIL else "a webhook"
        raise FailedPrecondition(
            f"listener {current.id} is {kind} listener: it has no "
            f"{', '.join(foreign)} (update_mask)",
            reason="WRONG_CHANNEL",
            metadata={"field": "update_mask", "channel": current.channel.value})


class ListenerServicer(pb_grpc.ListenerServiceServicer):
    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    def _stored(self, secret: str) -> str:
        """A webhook secret as it goes into the table: sealed when a key is configured."""
        box = self._deps.secret_box
        return box.seal(secret, purpose=LISTENER_SECRET_PURPOSE) if box.sealing else secret

    def _sealed_answer(self, generated: str) -> str:
        """A generated secret as the stored answer keeps it (sealed when a key is configured)."""
        box = self._deps.secret_box
        return (box.seal(generated, purpose=ANSWER_PURPOSE) if generated and box.sealing
                else generated)

    def _opened_answer(self, stored: str) -> str:
        """The generated secret of an answer, fresh or replayed (one stored in clear as is)."""
        try:
            return self._deps.secret_box.open(stored, purpose=ANSWER_PURPOSE)
        except SecretBoxError as exc:
            raise FailedPrecondition(
                f"the answer to this request_id cannot be replayed: {exc}; generate a new "
                "secret with UpdateListener (a new request_id)",
                reason="SECRET_KEY_NOT_CONFIGURED", metadata={"field": "request_id"}) from None

    def _email_enabled(self) -> bool:
        settings = self._deps.settings
        return settings is not None and settings.smtp_host is not None

    async def RegisterListener(self, request: pb.RegisterListenerRequest,
                               context: aio.ServicerContext) -> pb.RegisterListenerResponse:
        given = request.listener
        event_type = _event_type(given.event_type, field="listener.event_type", required=True)
        assert event_type is not None
        channel = _channel(given.channel, field="listener.channel")
        recipients: list[str] = []
        secret: str | None = None
        if channel is Channel.EMAIL:
            if given.url:
                raise InvalidArgument(
                    "listener.url is for webhooks; an e-mail listener has email_recipients",
                    reason="INVALID_URL", metadata={"field": "listener.url"})
            if given.secret:
                raise InvalidArgument(
                    "listener.secret is for webhooks: e-mails are not signed; leave it empty",
                    reason="INVALID_SECRET", metadata={"field": "listener.secret"})
            recipients = validate_email_recipients(list(given.email_recipients),
                                                   field="listener.email_recipients")
            url = ""
        else:
            if given.email_recipients:
                raise InvalidArgument(
                    "listener.email_recipients is for e-mail listeners (channel "
                    "LISTENER_CHANNEL_EMAIL); a webhook has a url",
                    reason="INVALID_EMAIL", metadata={"field": "listener.email_recipients"})
            url = validate_listener_url(given.url, field="listener.url")
            secret = (validate_secret(given.secret, field="listener.secret") if given.secret
                      else None)
        description = validate_description(given.description, field="listener.description")
        active = given.active if given.HasField("active") else True
        if channel is Channel.EMAIL and not self._email_enabled():
            raise FailedPrecondition(EMAIL_DISABLED, reason="EMAIL_NOT_CONFIGURED",
                                     metadata={"field": "listener.channel"})

        async def work(conn: asyncpg.Connection) -> bytes:
            chosen = "" if channel is Channel.EMAIL else secret or generate_secret()
            row = await repo.insert_listener(
                conn, event_type=int(event_type), url=url,
                secret=self._stored(chosen) if chosen else "", active=active,
                description=description, now=self._deps.clock.now(), channel=channel,
                email_recipients=recipients)
            # Ids and kinds only: a URL may carry a token in its query, a secret never shows.
            log.info("listener registered", extra={
                "listener_id": row.id, "event_type": int(event_type), "channel": channel.value,
                "active": active, "secret": "chosen" if secret else (
                    "none" if channel is Channel.EMAIL else "generated")})
            return pb.RegisterListenerResponse(
                listener=listener_to_pb(row),
                generated_secret=self._sealed_answer(
                    "" if secret or channel is Channel.EMAIL else chosen),
            ).SerializeToString()

        hashes = await listener_request_fingerprints("RegisterListener", request)
        raw = await run_request_once(self._deps.pool, "RegisterListener", request, work,
                                     request_hash=hashes.current, legacy_hash=hashes.legacy)
        response = pb.RegisterListenerResponse.FromString(raw)
        response.generated_secret = self._opened_answer(response.generated_secret)
        return response

    async def GetListener(self, request: pb.GetListenerRequest,
                          context: aio.ServicerContext) -> pb.GetListenerResponse:
        listener_id = _id(request.listener_id, "listener_id")
        async with self._deps.pool.acquire() as conn:
            row = await repo.get_listener(conn, listener_id)
        return pb.GetListenerResponse(listener=listener_to_pb(row))

    async def ListListeners(self, request: pb.ListListenersRequest,
                            context: aio.ServicerContext) -> pb.ListListenersResponse:
        size = effective_page_size(request.page_size)
        event_type = _event_type(request.event_type, field="event_type", required=False)
        filters = {"event_type": int(event_type) if event_type is not None else None}
        cursor = decode_page_token(request.page_token, filters, key=(int,))
        after = int(cursor.after[0]) if cursor else None
        async with self._deps.pool.acquire() as conn:
            rows = await repo.list_listeners(conn, event_type=filters["event_type"],
                                             after_id=after, limit=size + 1)
        page, listeners, more = fit_page(rows[:size], len(rows) > size, listener_to_pb)
        token = encode_page_token([page[-1].id], filters) if more else ""
        return pb.ListListenersResponse(listeners=listeners, next_page_token=token)

    async def UpdateListener(self, request: pb.UpdateListenerRequest,
                             context: aio.ServicerContext) -> pb.UpdateListenerResponse:
        given = request.listener
        listener_id = _id(given.listener_id, "listener.listener_id")
        paths = set(request.update_mask.paths)
        if not paths:
            raise InvalidArgument("update_mask must name at least one field",
                                  reason="EMPTY_UPDATE_MASK", metadata={"field": "update_mask"})
        unknown = sorted(paths - UPDATABLE_FIELDS)
        if unknown:
            fixed = [f for f in ("event_type", "channel") if f in unknown]
            hint = (f"; {' and '.join(fixed)} never change: register a new listener instead"
                    if fixed else "")
            raise InvalidArgument(
                f"update_mask names fields that cannot be updated: {', '.join(unknown)}; "
                f"updatable fields are {', '.join(sorted(UPDATABLE_FIELDS))}{hint}",
                reason="INVALID_UPDATE_MASK", metadata={"field": "update_mask"})
        try:
            url = (validate_listener_url(given.url, field="listener.url") if "url" in paths
                   else None)
            description = (validate_description(given.description,
                                                field="listener.description")
                           if "description" in paths else None)
            secret = (validate_secret(given.secret, field="listener.secret")
                      if "secret" in paths and given.secret else None)
            recipients = (validate_email_recipients(list(given.email_recipients),
                                                    field="listener.email_recipients")
                          if "email_recipients" in paths else None)
        except InvalidArgument:
            # A field of the other channel (a url for an e-mail listener) is WRONG_CHANNEL
            # whatever its value: say that rather than what is wrong with the value. The
            # channel never changes, so reading it outside the update is safe.
            async with self._deps.pool.acquire() as conn:
                _check_channel(await repo.get_listener(conn, listener_id), paths)
            raise
        active = given.active if "active" in paths else None

        async def work(conn: asyncpg.Connection) -> bytes:
            current = await repo.get_listener(conn, listener_id, for_update=True)
            _check_channel(current, paths)
            generated = generate_secret() if "secret" in paths and secret is None else None
            new_secret = secret or generated
            row = await repo.update_listener(
                conn, listener_id, now=self._deps.clock.now(), url=url, active=active,
                description=description,
                secret=self._stored(new_secret) if new_secret else None,
                email_recipients=recipients)
            log.info("listener updated", extra={
                "listener_id": listener_id, "fields": ",".join(sorted(paths)),
                "secret": "generated" if generated else ("chosen" if new_secret else "kept")})
            return pb.UpdateListenerResponse(
                listener=listener_to_pb(row),
                generated_secret=self._sealed_answer(generated or "")).SerializeToString()

        hashes = await listener_request_fingerprints("UpdateListener", request)
        raw = await run_request_once(self._deps.pool, "UpdateListener", request, work,
                                     request_hash=hashes.current, legacy_hash=hashes.legacy)
        response = pb.UpdateListenerResponse.FromString(raw)
        response.generated_secret = self._opened_answer(response.generated_secret)
        return response

    async def UnregisterListener(self, request: pb.UnregisterListenerRequest,
                                 context: aio.ServicerContext) -> pb.UnregisterListenerResponse:
        listener_id = _id(request.listener_id, "listener_id")

        async def work(conn: asyncpg.Connection) -> bytes:
            cancelled = await repo.delete_listener(conn, listener_id,
                                                   now=self._deps.clock.now())
            log.info("listener unregistered", extra={"listener_id": listener_id,
                                                     "cancelled_deliveries": cancelled})
            return pb.UnregisterListenerResponse(
                cancelled_deliveries=cancelled).SerializeToString()

        raw = await run_request_once(self._deps.pool, "UnregisterListener", request, work)
        return pb.UnregisterListenerResponse.FromString(raw)

    async def ListDeliveries(self, request: pb.ListDeliveriesRequest,
                             context: aio.ServicerContext) -> pb.ListDeliveriesResponse:
        size = effective_page_size(request.page_size)
        if request.listener_id < 0:
            raise InvalidArgument("listener_id must not be negative",
                                  reason="INVALID_ID", metadata={"field": "listener_id"})
        event_id: str | None = None
        if request.event_id:
            try:
                event_id = str(uuid.UUID(request.event_id))
            except ValueError:
                raise InvalidArgument(
                    f"event_id {request.event_id[:100]!r} is not an event id (a UUID, as in "
                    "the Promo-Event-Id header)", reason="INVALID_EVENT_ID",
                    metadata={"field": "event_id"}) from None
        statuses: list[str] = []
        for value in request.statuses:
            status = _STATUS_FROM_PB.get(value)
            if status is None:
                raise InvalidArgument(
                    f"statuses contains {value}, which is not a delivery status",
                    reason="INVALID_STATUS", metadata={"field": "statuses"})
            statuses.append(status.value)
        event_type = _event_type(request.event_type, field="event_type", required=False)
        listener_id = request.listener_id or None
        type_number = int(event_type) if event_type is not None else None
        wanted = sorted(set(statuses)) or None
        filters = {"listener_id": listener_id, "event_id": event_id, "statuses": wanted,
                   "event_type": type_number}
        cursor = decode_page_token(request.page_token, filters, key=(int,))
        before = int(cursor.after[0]) if cursor else None
        async with self._deps.pool.acquire() as conn:
            rows = await repo.list_deliveries(
                conn, listener_id=listener_id, event_id=event_id, event_type=type_number,
                statuses=wanted, before_id=before, limit=size + 1)
        page, deliveries, more = fit_page(rows[:size], len(rows) > size, delivery_to_pb)
        token = encode_page_token([page[-1].id], filters) if more else ""
        return pb.ListDeliveriesResponse(deliveries=deliveries, next_page_token=token)

    async def GetDelivery(self, request: pb.GetDeliveryRequest,
                          context: aio.ServicerContext) -> pb.GetDeliveryResponse:
        delivery_id = _id(request.delivery_id, "delivery_id")
        async with self._deps.pool.acquire() as conn:
            row = await repo.get_delivery(conn, delivery_id)
            attempts = await repo.list_attempts(conn, delivery_id)
            body = await repo.get_event_body(conn, delivery_id)
        return pb.GetDeliveryResponse(delivery=delivery_to_pb(row),
                                      attempts=[attempt_to_pb(a) for a in attempts],
                                      event_body=body)

    async def RedeliverEvent(self, request: pb.RedeliverEventRequest,
                             context: aio.ServicerContext) -> pb.RedeliverEventResponse:
        delivery_id = _id(request.delivery_id, "delivery_id")
        queued: list[int] = []
        now = self._deps.clock.now()

        async def work(conn: asyncpg.Connection) -> bytes:
            row, job_id = await repo.redeliver(conn, delivery_id, now=now)
            queued.append(job_id)
            return pb.RedeliverEventResponse(delivery=delivery_to_pb(row)).SerializeToString()

        raw = await run_request_once(self._deps.pool, "RedeliverEvent", request, work)
        for job_id in queued:  # empty on a replayed request: its job was queued the first time
            await queue_after_commit(self._deps.redis, job_id=job_id, due_at=now,
                                     queue_name=self._deps.queue_name)
        return pb.RedeliverEventResponse.FromString(raw)


def register(server: aio.Server, deps: Dependencies) -> None:
    pb_grpc.add_ListenerServiceServicer_to_server(ListenerServicer(deps), server)
