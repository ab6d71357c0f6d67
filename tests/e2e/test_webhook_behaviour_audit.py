"""Webhook delivery seen from a team running a real listener, against docs/webhooks.md.

What the other webhook tests leave out: listeners that misbehave at the HTTP level (slow, hung,
cut off mid-answer, invalid HTTP, a redirect to another host, a huge body, TLS spoken to a plain
port, odd status codes), each with the delivery's final status, attempts, next attempt time
against the documented backoff, the worker's log line, and a healthy listener on the same event
that must not wait for it; head-of-line blocking between listeners (the claim pipeline, the
per-process send slots, recording the results); a worker failing after the POST
but before recording it; a listener deactivated while its attempt is in flight; a DEAD delivery
redelivered after a secret rotation, signed fresh; and the body of every event type, from the
real emitters, against the documented schema.

Every delivery is driven through the outbox runner on the pinned clock (no sleeping for
backoffs); HTTP timeouts are real time, kept at 1-2.5 s.

Found and fixed: codes 600-999 were retried (now FAILED, as documented); a 2xx whose body was
cut short or slow counted as a lost connection over h11 but as delivered over httpx (now
delivered on both); a retry could be announced past the deadline and then never made (now the
last one is made a second before it); a listener hanging in one chunk held the next chunk's
sends back (now they start at once, two chunks in flight at most); a hung listener could hold
every send slot (now one listener gets three quarters at most); a delivered answer stayed
PENDING until the chunk's slowest send was over (now recorded as each send finishes); a send
that got no free slot in time was charged an attempt and a backoff (now it is retried a second
later, uncounted).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from google.protobuf import field_mask_pb2

from config.settings import Settings
from core.clock import FixedClock
from core.events import EventType
from core.webhook_signature import StaleTimestamp, sign, verify
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import promotions_pb2 as ppb
from storage import webhooks as repo
from tests.conftest import Api
from tests.e2e.campaign_helpers import create_campaign, set_statuses
from tests.e2e.code_helpers import code_promotion, codes_file, upload
from tests.e2e.promo_helpers import get_reward, promotion, reward_type
from tests.e2e.test_bonuses_api import create as create_bonus_definition
from tests.e2e.test_bonuses_api import customers as upsert_customers
from tests.e2e.test_bonuses_api import definition as bonus_definition
from tests.e2e.test_bonuses_api import events as record_events
from tests.e2e.test_bonuses_api import request as request_bonus
from tests.webhook_listener import SECRET, WebhookListener
from workers import main as _main  # noqa: F401  (registers every outbox handler)
from workers import webhooks
from workers.outbox import run_outbox_job

SCHEDULED = EventType.SCHEDULED_CAMPAIGN
THRESHOLD = EventType.CODE_POOL_THRESHOLD
WEBHOOK_LOG = "promo.webhooks"


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

@contextlib.asynccontextmanager
async def worker_ctx(settings: Settings, pool: asyncpg.Pool,
                     clock: FixedClock) -> AsyncIterator[dict[str, Any]]:
    """What a worker process hands its jobs (its HTTP client and send slots), on the pinned
    clock, without Redis."""
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    await webhooks.setup(ctx)
    try:
        yield ctx
    finally:
        await webhooks.teardown(ctx)


async def add_listener(pool: asyncpg.Pool, url: str, now: datetime, *,
                       event_type: EventType = SCHEDULED, secret: str = SECRET) -> int:
    async with pool.acquire() as conn:
        row = await repo.insert_listener(conn, event_type=int(event_type), url=url,
                                         secret=secret, active=True, description="audit",
                                         now=now)
    return row.id


async def emit(pool: asyncpg.Pool, clock: FixedClock, *, event_type: EventType = SCHEDULED,
               payload: dict[str, Any] | None = None, **kw: Any) -> repo.EmittedEvent:
    async with pool.acquire() as conn, conn.transaction():
        emitted = await repo.emit_event(conn, event_type=event_type, now=clock.now(),
                                        payload=payload or {"campaign_id": "spring"}, **kw)
    assert emitted is not None
    return emitted


async def delivery_of(pool: asyncpg.Pool, listener_id: int) -> repo.DeliveryRow:
    async with pool.acquire() as conn:
        delivery_id = await conn.fetchval(
            "SELECT max(id) FROM webhook_deliveries WHERE listener_id = $1", listener_id)
        assert delivery_id is not None
        return await repo.get_delivery(conn, delivery_id)


async def deliveries_of(pool: asyncpg.Pool, listener_id: int) -> list[repo.DeliveryRow]:
    async with pool.acquire() as conn:
        ids = [r["id"] for r in await conn.fetch(
            "SELECT id FROM webhook_deliveries WHERE listener_id = $1 ORDER BY id",
            listener_id)]
        return [await repo.get_delivery(conn, i) for i in ids]


async def attempts_of(pool: asyncpg.Pool, delivery_id: int) -> list[repo.AttemptRow]:
    async with pool.acquire() as conn:
        return await repo.list_attempts(conn, delivery_id)


async def job_of(pool: asyncpg.Pool, delivery_id: int) -> int:
    async with pool.acquire() as conn:
        job_id: int = await conn.fetchval(
            "SELECT outbox_job_id FROM webhook_deliveries WHERE id = $1", delivery_id)
    return job_id


async def next_attempt(ctx: dict[str, Any], pool: asyncpg.Pool, clock: FixedClock,
                       delivery_id: int) -> str:
    """Move the pinned clock to the delivery's next attempt time and run its job once."""
    async with pool.acquire() as conn:
        row = await repo.get_delivery(conn, delivery_id)
    assert row.next_attempt_at is not None, row
    clock.set(max(clock.now(), row.next_attempt_at))
    return await run_outbox_job(ctx, await job_of(pool, delivery_id))


class ArrivalClock:
    """When (monotonic seconds after ``start``) a listener got its n-th request."""

    def __init__(self, listener: WebhookListener) -> None:
        self.listener = listener
        self.start = time.monotonic()
        self.arrivals: list[float] = []
        self._task = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while True:
            while len(self.arrivals) < len(self.listener.received):
                self.arrivals.append(round(time.monotonic() - self.start, 2))
            await asyncio.sleep(0.005)

    async def stop(self) -> list[float]:
        await asyncio.sleep(0.02)
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.arrivals


Behaviour = Callable[["RawListener", asyncio.StreamReader, asyncio.StreamWriter],
                     Awaitable[None]]


@dataclass
class RawListener:
    """A loopback server that reads one HTTP request (unless ``read_request`` is false) and then
    misbehaves as ``behaviour`` says, recording the requests and the bytes it wrote."""

    behaviour: Behaviour
    host: str = "127.0.0.1"
    read_request: bool = True
    scheme: str = "http"
    path: str = "/hooks/raw"
    requests: list[bytes] = field(default_factory=list)
    written: int = 0
    stopping: asyncio.Event = field(default_factory=asyncio.Event)
    port: int = 0
    _server: asyncio.Server | None = None
    _writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}{self.path}"

    async def start(self) -> RawListener:
        self._server = await asyncio.start_server(self._serve, self.host, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.stopping.set()
        if self._server is not None:
            self._server.close()
            for writer in list(self._writers):
                writer.close()
            await asyncio.sleep(0.01)

    async def write(self, writer: asyncio.StreamWriter, data: bytes) -> None:
        writer.write(data)
        await writer.drain()
        self.written += len(data)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self.read_request:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")), b"0"))
                self.requests.append(head + await reader.readexactly(length))
            else:
                self.requests.append(await reader.read(5))
            await self.behaviour(self, reader, writer)
        except Exception:  # a misbehaving peer's end: nothing to report
            pass
        finally:
            self._writers.discard(writer)
            writer.close()


def answer(data: bytes) -> Behaviour:
    async def behave(raw: RawListener, _: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await raw.write(writer, data)
    return behave


def after(seconds: float, data: bytes) -> Behaviour:
    async def behave(raw: RawListener, _: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(seconds)
        await raw.write(writer, data)
    return behave


async def hang(raw: RawListener, _: asyncio.StreamReader, __: asyncio.StreamWriter) -> None:
    await raw.stopping.wait()


async def reset(raw: RawListener, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Abort with a TCP RST (SO_LINGER 0), as a crashing listener process does."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def huge(status: bytes) -> Behaviour:
    """An answer declaring 1 GiB of body, streamed for as long as the peer reads."""
    async def behave(raw: RawListener, _: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        await raw.write(writer, b"HTTP/1.1 " + status + b"\r\nContent-Type: text/plain\r\n"
                        b"Content-Length: 1073741824\r\n\r\n")
        chunk = b"x" * 65536
        for _n in range(16384):
            await raw.write(writer, chunk)
    return behave


async def drip_after_200(raw: RawListener, _: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
    """A 200 status line at once, then the 10-byte body one byte every 0.4 s."""
    await raw.write(writer, b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n")
    for _n in range(10):
        await asyncio.sleep(0.4)
        await raw.write(writer, b"k")


async def plain_http_server_meets_tls(raw: RawListener, _: asyncio.StreamReader,
                                      writer: asyncio.StreamWriter) -> None:
    """What a plain HTTP server says to a TLS ClientHello: 400, in clear."""
    await raw.write(writer, b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n")


# ---------------------------------------------------------------------------------------------
# 1. Misbehaving listeners: one attempt each, a healthy listener of the same event beside it
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    behaviour: Behaviour
    status: str  # the delivery's status after the attempt
    code: int | None  # last_status_code
    error: str | None  # a regular expression the whole last_error must match (None: no error)
    read_request: bool = True
    scheme: str = "http"


TIMEOUT_ERROR = re.escape("timeout after 1 s (TimeoutError)")
CASES: dict[str, Case] = {
    "answers_after_the_timeout": Case(after(1.6, b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                                      "PENDING", None, TIMEOUT_ERROR),
    "hangs_forever": Case(hang, "PENDING", None, TIMEOUT_ERROR),
    "closes_mid_headers": Case(answer(b"HTTP/1.1 200 OK\r\nContent-Le"), "PENDING", None,
                               re.escape("RemoteProtocolError: peer unexpectedly closed "
                                         "connection")),
    # A 2xx status line is the answer, whatever happens to the body after it (docs/webhooks.md).
    "closes_mid_body": Case(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"),
                            "DELIVERED", 200, None),
    "resets_the_connection": Case(reset, "PENDING", None, re.escape(
        "RemoteProtocolError: Server disconnected without sending a response.")),
    "invalid_http": Case(answer(b"garbage\r\n\r\n"), "PENDING", None,
                         r"RemoteProtocolError: illegal status line.*"),
    "status_line_then_slow_body_past_the_timeout": Case(drip_after_200, "DELIVERED", 200,
                                                        None),
    "huge_2xx_body": Case(huge(b"200 OK"), "DELIVERED", 200, None),
    "huge_5xx_body": Case(huge(b"503 Busy"), "PENDING", 503, re.escape("HTTP 503: " + "x" * 512)),
    "429_with_retry_after_date": Case(answer(
        b"HTTP/1.1 429 Too Many\r\nRetry-After: Wed, 21 Oct 2099 07:28:00 GMT\r\n"
        b"Content-Length: 4\r\n\r\nslow"), "PENDING", 429, re.escape("HTTP 429: slow")),
    "100_continue_then_200": Case(answer(
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        "DELIVERED", 200, None),
    # docs/webhooks.md: retried are "5xx, 408, 425, 429"; "any other status" is FAILED at once.
    "status_999_is_not_5xx": Case(answer(b"HTTP/1.1 999 Odd\r\nContent-Length: 0\r\n\r\n"),
                                  "FAILED", 999, re.escape("HTTP 999")),
    "status_600_is_not_5xx": Case(answer(b"HTTP/1.1 600 Odd\r\nContent-Length: 0\r\n\r\n"),
                                  "FAILED", 600, re.escape("HTTP 600")),
    "tls_to_a_plain_http_port": Case(plain_http_server_meets_tls, "PENDING", None,
                                     r"ConnectError: \[SSL: WRONG_VERSION_NUMBER\] wrong version "
                                     r"number.*", read_request=False, scheme="https"),
}


@pytest.mark.parametrize("name", list(CASES))
async def test_a_misbehaving_listener_gets_the_documented_outcome_and_holds_up_no_other(
        name: str, settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener, caplog: pytest.LogCaptureFixture) -> None:
    """Per docs/webhooks.md "Retries, failures and redelivery": timeouts, lost connections and
    5xx/429 are retried with backoff base x 2^(attempt-1) x 0.5-1.0 (Retry-After ignored); other
    statuses FAILED at once; 2xx DELIVERED. One attempt, logged as started and finished; a
    failed attempt logged at WARNING ("delivery attempt"); the healthy listener of the same
    event, claimed in the same batch, gets its POST at once and is DELIVERED."""
    case = CASES[name]
    tuned = settings.model_copy(update={"webhook_timeout_seconds": 1.0,
                                        "job_retry_base_seconds": 10.0,
                                        "webhook_retry_max_seconds": 80.0})
    raw = await RawListener(case.behaviour, read_request=case.read_request,
                            scheme=case.scheme).start()
    try:
        bad_id = await add_listener(pool, raw.url, clock.now())
        good_id = await add_listener(pool, listener.url, clock.now())
        emitted = await emit(pool, clock)
        bad_delivery = (await delivery_of(pool, bad_id)).id
        with caplog.at_level(logging.DEBUG, logger=WEBHOOK_LOG):
            async with worker_ctx(tuned, pool, clock) as ctx:
                arrivals = ArrivalClock(listener)
                began = time.monotonic()
                await run_outbox_job(ctx, await job_of(pool, bad_delivery))
                took = time.monotonic() - began
                healthy_arrivals = await arrivals.stop()
    finally:
        await raw.stop()

    row = await delivery_of(pool, bad_id)
    [attempt] = await attempts_of(pool, row.id)
    assert (row.status.value, row.attempts, row.last_status_code) == (case.status, 1, case.code)
    if case.error is None:
        assert row.last_error is None and attempt.error is None
    else:
        assert row.last_error is not None and re.fullmatch(case.error, row.last_error), \
            row.last_error
        assert attempt.error == row.last_error
    assert attempt.finished_at is not None and attempt.status_code == case.code
    assert attempt.url == raw.url
    if case.status == "PENDING":  # attempt 1 failed: next in base x 2^0 x [0.5, 1.0]
        assert row.next_attempt_at is not None
        delay = (row.next_attempt_at - clock.now()).total_seconds()
        assert 5.0 <= delay <= 10.0, delay
    else:
        assert row.next_attempt_at is None
    if case.status == "DELIVERED":
        assert row.delivered_at == clock.now()
    assert took < 2.5, took  # bounded by the 1 s timeout, whatever the listener does
    logged = [r for r in caplog.records if r.getMessage() == "delivery attempt"
              and getattr(r, "delivery_id", None) == row.id]
    if case.status == "DELIVERED":
        assert all(r.levelno == logging.DEBUG for r in logged)
    else:
        [line] = logged
        assert line.levelno == logging.WARNING
        assert (line.__dict__["attempt"], line.__dict__["status_code"], line.__dict__["outcome"],
                line.__dict__["error"], line.__dict__["event_id"]) == (
            1, case.code, case.status, row.last_error, emitted.event_id)
    assert not any(SECRET in r.getMessage() or SECRET in str(vars(r)) for r in caplog.records)
    if case.read_request:
        assert len(raw.requests) == 1  # one POST, never repeated within the attempt

    good = await delivery_of(pool, good_id)
    assert (good.status.value, good.attempts) == ("DELIVERED", 1)
    [got] = listener.received
    assert got.verify_error is None and got.event_id == emitted.event_id
    assert healthy_arrivals and healthy_arrivals[0] < 0.9, healthy_arrivals


@pytest.mark.parametrize("name", ["closes_mid_body", "status_line_then_slow_body_past_the_timeout"])
async def test_the_same_answer_gets_the_same_outcome_over_both_http_clients(
        name: str, settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """docs/webhooks.md: POSTs go out through h11; "URLs that are not plain ASCII" (and every
    URL when a proxy is configured) go through httpx instead, with the same rules (2xx
    DELIVERED; a lost connection or a timeout retried). A listener that answers "200" and then
    cuts the body short, or sends it slower than the timeout, gets one outcome over the fast path
    and another over httpx (which returns at the status line)."""
    tuned = settings.model_copy(update={"webhook_timeout_seconds": 1.0})
    fast = await RawListener(CASES[name].behaviour).start()
    slow_path = await RawListener(CASES[name].behaviour, path="/hooks/r\u00e9ception").start()
    try:
        fast_id = await add_listener(pool, fast.url, clock.now())
        httpx_id = await add_listener(pool, slow_path.url, clock.now())
        emitted = await emit(pool, clock)
        async with worker_ctx(tuned, pool, clock) as ctx:
            await run_outbox_job(ctx, emitted.outbox_job_ids[0])  # claims both
    finally:
        await fast.stop()
        await slow_path.stop()
    assert (len(fast.requests), len(slow_path.requests)) == (1, 1)
    over_h11, over_httpx = await delivery_of(pool, fast_id), await delivery_of(pool, httpx_id)
    assert (over_h11.status.value, over_h11.last_status_code, over_h11.last_error) == (
        over_httpx.status.value, over_httpx.last_status_code, over_httpx.last_error)


async def test_a_huge_answer_is_not_read_to_its_end(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """A listener answering 2xx (or 5xx) with a 1 GiB body: the worker stops reading early (the
    docs: a 2xx body is drained to 64 KiB, at most 512 bytes of a failure are kept), so the
    listener manages to push only what the socket buffers hold."""
    for status, expected in ((b"200 OK", "DELIVERED"), (b"503 Busy", "PENDING")):
        raw = await RawListener(huge(status)).start()
        try:
            listener_id = await add_listener(pool, raw.url, clock.now())
            await emit(pool, clock)
            async with worker_ctx(settings, pool, clock) as ctx:
                await run_outbox_job(ctx, await job_of(pool, (await delivery_of(
                    pool, listener_id)).id))
            await asyncio.sleep(0.2)
        finally:
            await raw.stop()
        assert (await delivery_of(pool, listener_id)).status.value == expected
        assert raw.written < 32 * 1024 * 1024, raw.written


async def test_a_redirect_to_another_host_is_not_followed_and_leaks_no_signature(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """docs/webhooks.md: "Redirects are not followed (a signed POST is never forwarded):
    register the final URL." A 307 pointing at another host (127.0.0.2): FAILED at once with
    the Location in the error, and the other host receives nothing at all."""
    collector = await RawListener(answer(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
                                  host="127.0.0.2").start()
    target = f"http://127.0.0.2:{collector.port}/collect?from=promo"
    redirector = await RawListener(answer(
        f"HTTP/1.1 307 Temporary Redirect\r\nLocation: {target}\r\n"
        "Content-Length: 0\r\n\r\n".encode())).start()
    try:
        listener_id = await add_listener(pool, redirector.url, clock.now())
        await emit(pool, clock)
        async with worker_ctx(settings, pool, clock) as ctx:
            await run_outbox_job(ctx, await job_of(pool, (await delivery_of(
                pool, listener_id)).id))
        await asyncio.sleep(0.1)
    finally:
        await redirector.stop()
        await collector.stop()
    row = await delivery_of(pool, listener_id)
    assert (row.status.value, row.attempts, row.last_status_code) == ("FAILED", 1, 307)
    assert row.last_error == (f"HTTP 307: redirected to {target}; redirects are not followed, "
                              "register the final URL")
    assert collector.requests == []
    assert len(redirector.requests) == 1


async def test_no_retry_is_announced_after_the_deadline(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    """docs/webhooks.md: a delivery is given up "once its deadline passes" (for type 5 the
    campaign's execution time: "approving after it is pointless"); PENDING means "waiting for
    its first or next attempt; next_attempt_time says when". With the default backoff (base
    1 s, cap 300 s as it was; the cap is an hour now) and a listener down for the whole window of
    a 10-minute deadline,
    no PENDING state may announce a next attempt at or after the deadline: no attempt is ever
    made then (the delivery turns DEAD without a request), so the listener gets no last try
    before the deadline and the delivery log promises an attempt that will not happen."""
    tuned = settings.model_copy(update={"job_retry_base_seconds": 1.0,
                                        "webhook_retry_max_seconds": 300.0})
    listener.default = 503
    listener_id = await add_listener(pool, listener.url, clock.now())
    deliver_by = clock.now() + timedelta(minutes=10)
    emitted = await emit(pool, clock, deliver_by=deliver_by)
    announced: list[tuple[int, datetime, datetime]] = []  # (attempt, made at, next announced)
    async with worker_ctx(tuned, pool, clock) as ctx:
        made_at = clock.now()
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
        row = await delivery_of(pool, listener_id)
        while row.status.value == "PENDING":
            assert row.next_attempt_at is not None
            announced.append((row.attempts, made_at, row.next_attempt_at))
            made_at = max(clock.now(), row.next_attempt_at)
            await next_attempt(ctx, pool, clock, row.id)
            row = await delivery_of(pool, listener_id)
    assert row.status.value == "DEAD"
    late = [(n, (deliver_by - at).total_seconds(), (when - deliver_by).total_seconds())
            for n, at, when in announced if when >= deliver_by]
    assert late == [], (
        f"attempt {late[0][0]} failed {late[0][1]:.0f} s before the deadline and the next was "
        f"announced {late[0][2]:.0f} s after it; the delivery ended DEAD ({row.last_error!r}) "
        f"after {row.attempts} attempts, with no attempt in the last {late[0][1]:.0f} s")


async def test_the_default_retry_schedule_spans_hours_within_the_default_deadline(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    """docs/webhooks.md defaults: 30 attempts, backoff 1 s x 2^(n-1) capped at an hour, times
    0.5-1.0, and a 24 h deadline: the 29 waits add up to 9.1-18.1 hours, so a listener answering
    503 through a deploy or a night's outage still gets the event, and the deliveries end DEAD
    before the deadline. (The old defaults, 12 attempts capped at 300 s, gave up after at most
    1,111 s: a listener down for 19 minutes lost the event, 23.7 h before the deadline.)"""
    defaults = Settings.model_fields
    tuned = settings.model_copy(update={
        "job_retry_base_seconds": defaults["job_retry_base_seconds"].default,
        "webhook_retry_max_seconds": defaults["webhook_retry_max_seconds"].default})
    assert (tuned.job_retry_base_seconds, tuned.webhook_max_attempts,
            tuned.webhook_deadline_seconds, tuned.webhook_retry_max_seconds) == (
        1.0, 30, 86400, 3600)
    listener.default = 503
    listener_id = await add_listener(pool, listener.url, clock.now())
    start = clock.now()
    emitted = await emit(pool, clock)
    async with worker_ctx(tuned, pool, clock) as ctx:
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
        row = await delivery_of(pool, listener_id)
        while row.status.value == "PENDING":
            await next_attempt(ctx, pool, clock, row.id)
            row = await delivery_of(pool, listener_id)
    span = (clock.now() - start).total_seconds()
    full = sum(min(3600, 2 ** n) for n in range(29))  # 65,295 s: 18.1 h
    assert (row.status.value, row.attempts) == ("DEAD", 30)
    assert full / 2 <= span <= full, span
    assert span < 86400
    assert len(listener.received) == 30


async def test_a_short_deadline_keeps_every_wait_to_a_tenth_of_it(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    """The scheduled-campaign event's deadline is the execution, 30 minutes after it is emitted.
    With the hour-long default cap a listener back after 20 minutes would wait for a retry
    announced past the deadline (made a second before it: no time left to approve); the waits
    are therefore capped at a tenth of the delivery's window, 3 minutes here, and the listener
    gets the event within 3 minutes of coming back."""
    tuned = settings.model_copy(update={"job_retry_base_seconds": 1.0,
                                        "webhook_retry_max_seconds": 3600.0})
    listener.default = 503
    listener_id = await add_listener(pool, listener.url, clock.now())
    start = clock.now()
    back_at = start + timedelta(minutes=20)
    emitted = await emit(pool, clock, deliver_by=start + timedelta(minutes=30))
    waits: list[float] = []
    async with worker_ctx(tuned, pool, clock) as ctx:
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
        row = await delivery_of(pool, listener_id)
        while row.status.value == "PENDING":
            assert row.next_attempt_at is not None
            waits.append((row.next_attempt_at - clock.now()).total_seconds())
            if row.next_attempt_at >= back_at:
                listener.default = 200
            await next_attempt(ctx, pool, clock, row.id)
            row = await delivery_of(pool, listener_id)
    assert row.status.value == "DELIVERED", row
    assert max(waits) <= 180, waits
    assert back_at <= clock.now() <= back_at + timedelta(minutes=3), clock.now() - start


# ---------------------------------------------------------------------------------------------
# Head-of-line blocking: one slow listener must not hold up a healthy one
# ---------------------------------------------------------------------------------------------

async def _slow_and_healthy(pool: asyncpg.Pool, clock: FixedClock, slow_url: str,
                            healthy: WebhookListener, events: int) -> tuple[int, int]:
    """A slow listener registered first and a healthy one, both for type 5; ``events`` events,
    so the deliveries go slow, healthy, slow, healthy, ... by id."""
    slow_id = await add_listener(pool, slow_url, clock.now())
    healthy_id = await add_listener(pool, healthy.url, clock.now())
    for i in range(events):
        await emit(pool, clock, payload={"campaign_id": f"c{i}"})
    return slow_id, healthy_id


async def test_a_hung_listener_in_one_chunk_delays_the_next_chunks_healthy_deliveries(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    """docs/webhooks.md, "Throughput: batches": a job claims its chunk and, while it is in
    flight, the next one. A job's second chunk is only sent once every send of the first has
    finished, so a healthy listener's delivery claimed in chunk 2 waits for the hung listener's
    timeout in chunk 1 (its own arq job finds it leased and does nothing). Batch size 4 stands
    for the default 100 (the 101st due delivery waits the same way)."""
    tuned = settings.model_copy(update={"webhook_batch_size": 4, "webhook_timeout_seconds": 2.0})
    slow = await RawListener(hang).start()
    try:
        slow_id, healthy_id = await _slow_and_healthy(pool, clock, slow.url, listener, 3)
        slow_rows, healthy_rows = (await deliveries_of(pool, slow_id),
                                   await deliveries_of(pool, healthy_id))
        async with worker_ctx(tuned, pool, clock) as ctx:
            arrivals = ArrivalClock(listener)
            job = asyncio.create_task(run_outbox_job(ctx, await job_of(pool, slow_rows[0].id)))
            await asyncio.sleep(0.3)  # the job has claimed both chunks by now
            # The healthy delivery's own arq job comes up: it finds the delivery taken.
            assert await run_outbox_job(ctx, await job_of(pool, healthy_rows[2].id)) == \
                "not due or already done"
            await job
            times = await arrivals.stop()
    finally:
        await slow.stop()
    assert [r.status.value for r in await deliveries_of(pool, healthy_id)] == ["DELIVERED"] * 3
    assert len(times) == 3
    assert max(times) < 1.5, f"healthy listener's POSTs went out at {times} s"


async def test_a_slow_listener_cannot_hold_every_send_slot(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    """docs/webhooks.md: at most PROMO_WEBHOOK_CONCURRENCY POSTs in flight per worker process
    (default 32), and one listener at most three quarters of them (at least one fewer). A hung
    listener's deliveries used to take every slot, and a healthy listener's POSTs waited for
    their timeout; now they go at once in the slot the hung one cannot take. Concurrency 2
    stands for the default 32 (32 hung deliveries to one listener did the same)."""
    tuned = settings.model_copy(update={"webhook_concurrency": 2, "webhook_timeout_seconds": 2.0})
    slow = await RawListener(hang).start()
    try:
        slow_id, healthy_id = await _slow_and_healthy(pool, clock, slow.url, listener, 2)
        first = (await deliveries_of(pool, slow_id))[0]
        async with worker_ctx(tuned, pool, clock) as ctx:
            arrivals = ArrivalClock(listener)
            await run_outbox_job(ctx, await job_of(pool, first.id))
            times = await arrivals.stop()
    finally:
        await slow.stop()
    assert [r.status.value for r in await deliveries_of(pool, healthy_id)] == ["DELIVERED"] * 2
    assert len(times) == 2
    assert max(times) < 0.5, f"healthy listener's POSTs went out at {times} s"


async def job_row(pool: asyncpg.Pool, job_id: int) -> asyncpg.Record:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(
            "SELECT status, attempts, due_at, locked_until FROM outbox_jobs WHERE id = $1", job_id)
    assert row is not None
    return row


async def assert_not_charged(pool: asyncpg.Pool, clock: FixedClock, settings: Settings,
                             delivery_id: int) -> None:
    """A send never made (no free slot in time) is no attempt: nothing logged, nothing counted,
    retried PROMO_JOB_RETRY_BASE_SECONDS after the send gave up waiting."""
    async with pool.acquire() as conn:
        row = await repo.get_delivery(conn, delivery_id)
    assert (row.status.value, row.attempts) == ("PENDING", 0), row
    assert row.last_error is not None and row.last_error.startswith(
        "not sent: no free send slot in time"), row.last_error
    assert "not counted as an attempt" in row.last_error
    assert await attempts_of(pool, delivery_id) == []
    job = await job_row(pool, await job_of(pool, delivery_id))
    # Leased past the retry time: the retry is queued under an id of its own, which the
    # sweeper cannot know, so the sweeper must not queue a second copy meanwhile.
    lease = timedelta(seconds=settings.job_lease_seconds)
    assert (job["status"], job["attempts"], job["locked_until"]) == (
        "pending", 0, job["due_at"] + lease), job
    assert job["due_at"] == clock.now() + timedelta(seconds=settings.job_retry_base_seconds), \
        (job["due_at"], clock.now())


async def test_a_healthy_delivery_is_not_charged_an_attempt_for_a_slow_listeners_slots(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    """docs/webhooks.md: "A send that gets no free slot within half the lease is not made ...
    It is not an attempt either". When the slots are held by a hung listener, the healthy
    listener's delivery waits for its retry but pays nothing: no attempt counted (towards
    PROMO_WEBHOOK_MAX_ATTEMPTS), no attempt logged, retried shortly after, delivered then as
    attempt 1. Lease 5 s (the minimum; timeout capped at 2.5 s), one slot: two hung deliveries
    ahead of the healthy one. (Before, it was charged an attempt and a backoff.)"""
    tuned = settings.model_copy(update={"webhook_concurrency": 1, "job_lease_seconds": 5,
                                        "webhook_timeout_seconds": 10.0})
    slow = await RawListener(hang).start()
    try:
        slow_id = await add_listener(pool, slow.url, clock.now(), event_type=THRESHOLD)
        healthy_id = await add_listener(pool, listener.url, clock.now())
        for i in range(2):
            await emit(pool, clock, event_type=THRESHOLD, payload={"promotion_code": f"P{i}"})
        await emit(pool, clock)
        first = (await deliveries_of(pool, slow_id))[0]
        async with worker_ctx(tuned, pool, clock) as ctx:
            await run_outbox_job(ctx, await job_of(pool, first.id))
            healthy = await delivery_of(pool, healthy_id)
            await assert_not_charged(pool, clock, tuned, healthy.id)
            assert listener.received == []
            clock.advance(timedelta(seconds=1))
            await run_outbox_job(ctx, await job_of(pool, healthy.id))
    finally:
        await slow.stop()
    healthy = await delivery_of(pool, healthy_id)
    assert (healthy.status.value, healthy.attempts, healthy.last_error) == ("DELIVERED", 1, None), \
        (healthy.status.value, healthy.attempts, healthy.last_error, len(listener.received))
    assert [a.attempt for a in await attempts_of(pool, healthy.id)] == [1]
    assert len(listener.received) == 1


async def test_the_jobs_own_send_without_a_slot_is_not_charged_either(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    """The same for the delivery whose own outbox job runs (its attempt was counted by the
    outbox runner, not by the claim): every slot held elsewhere for longer than half the lease,
    its send is not made and the runner's count is given back too."""
    tuned = settings.model_copy(update={"webhook_concurrency": 1, "job_lease_seconds": 5})
    listener_id = await add_listener(pool, listener.url, clock.now())
    await emit(pool, clock)
    delivery = await delivery_of(pool, listener_id)
    async with worker_ctx(tuned, pool, clock) as ctx:
        slots = ctx[webhooks.SLOTS_KEY]
        held = ("elsewhere", 1)
        await slots.acquire(held)  # the worker's only slot, taken by another host's send
        try:
            assert await run_outbox_job(ctx, await job_of(pool, delivery.id)) != "done"
        finally:
            slots.release(held)
        await assert_not_charged(pool, clock, tuned, delivery.id)
        clock.advance(timedelta(seconds=1))
        await run_outbox_job(ctx, await job_of(pool, delivery.id))
    delivered = await delivery_of(pool, listener_id)
    assert (delivered.status.value, delivered.attempts) == ("DELIVERED", 1), delivered
    assert [a.attempt for a in await attempts_of(pool, delivery.id)] == [1]
    job = await job_row(pool, await job_of(pool, delivery.id))
    assert (job["status"], job["attempts"]) == ("done", 1), job


async def test_a_delivered_answer_is_recorded_without_waiting_for_a_hung_neighbour(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    """A healthy listener answered 200 at once, in the same batch as a hung listener. Its
    delivery used to stay PENDING (attempt unfinished) until the hung one timed out, because a
    batch recorded every result in one statement after the last send: ListDeliveries showed a
    delivered event as pending, and a worker dying in that window made the healthy listener get
    it again. Now results are recorded as the sends finish."""
    tuned = settings.model_copy(update={"webhook_timeout_seconds": 2.0})
    slow = await RawListener(hang).start()
    try:
        slow_id, healthy_id = await _slow_and_healthy(pool, clock, slow.url, listener, 1)
        async with worker_ctx(tuned, pool, clock) as ctx:
            job = asyncio.create_task(run_outbox_job(
                ctx, await job_of(pool, (await delivery_of(pool, slow_id)).id)))
            for _ in range(100):
                if listener.received:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.5)  # the 200 has been answered for half a second
            seen = await delivery_of(pool, healthy_id)
            await job
    finally:
        await slow.stop()
    assert len(listener.received) == 1
    assert (seen.status.value, seen.last_status_code) == ("DELIVERED", 200), seen


# ---------------------------------------------------------------------------------------------
# 2. Signatures: a DEAD delivery redelivered after a rotation is signed fresh
# ---------------------------------------------------------------------------------------------

async def test_a_dead_delivery_redelivered_after_a_rotation_is_signed_fresh(
        api: Api, settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    """docs/webhooks.md: Promo-Timestamp is "Unix seconds when this attempt was signed";
    RedeliverEvent uses "the listener's current URL and secret"; during the grace the previous
    secret signs too (new first). The first request replayed at redelivery time is refused by
    the documented 5-minute tolerance; the redelivered one verifies with the new secret alone
    and with the old one alone, and becomes stale 301 s later."""
    stub = lpb_grpc.ListenerServiceStub(api.channel)
    created = await stub.RegisterListener(lpb.RegisterListenerRequest(
        request_id="reg", listener=lpb.Listener(event_type=lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN,
                                                url=listener.url, secret=SECRET)),
        metadata=api.key())
    tuned = settings.model_copy(update={"webhook_max_attempts": 1})
    listener.answer(503)
    start = clock.now()
    emitted = await emit(pool, clock)
    async with worker_ctx(tuned, pool, clock) as ctx:
        await run_outbox_job(ctx, emitted.outbox_job_ids[0])
        row = await delivery_of(pool, created.listener.listener_id)
        assert (row.status.value, row.attempts) == ("DEAD", 1)
        clock.set(start + timedelta(hours=1))
        rotated = await stub.UpdateListener(lpb.UpdateListenerRequest(
            request_id="rot", listener=lpb.Listener(listener_id=created.listener.listener_id),
            update_mask=field_mask_pb2.FieldMask(paths=["secret"])), metadata=api.key())
        new = rotated.generated_secret
        listener.secrets = [new]
        clock.set(start + timedelta(hours=2))
        await stub.RedeliverEvent(lpb.RedeliverEventRequest(request_id="again",
                                                            delivery_id=row.id),
                                  metadata=api.key())
        assert await run_outbox_job(ctx, await job_of(pool, row.id)) == "done"
    first, again = listener.received
    now = int(clock.now().timestamp())
    assert first.headers["promo-timestamp"] == str(int(start.timestamp()))
    assert again.headers["promo-timestamp"] == str(now)
    assert (again.headers["promo-event-id"], again.body) == (emitted.event_id, first.body)
    assert again.headers["promo-delivery-attempt"] == "2"
    assert again.headers["promo-signature"] == (
        f"v1={sign(new, now, again.body)}, v1={sign(SECRET, now, again.body)}")
    assert again.verify_error is None
    verify(new, again.headers, again.body, now=now)
    verify(SECRET, again.headers, again.body, now=now)
    with pytest.raises(StaleTimestamp):  # the first request, replayed two hours later
        verify([new, SECRET], first.headers, first.body, now=now)
    with pytest.raises(StaleTimestamp):
        verify(new, again.headers, again.body, now=now + 301)
    assert (await delivery_of(pool, row.listener_id)).status.value == "DELIVERED"


# ---------------------------------------------------------------------------------------------
# 3. Duplicates and stopping
# ---------------------------------------------------------------------------------------------

async def test_a_failure_after_the_2xx_before_recording_resends_the_same_event(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock, listener: WebhookListener,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """docs/webhooks.md: delivery is at least once; "a listener must de-duplicate on
    Promo-Event-Id", "the same on every attempt and redelivery". The listener answered 200,
    then recording the result failed (the database went away): the next attempt sends the same
    event id and the same bytes, signed at its own time, with attempt 2; attempt 1 is marked
    interrupted and the listener processes the event once."""
    listener_id = await add_listener(pool, listener.url, clock.now())
    emitted = await emit(pool, clock)
    real_finish = repo.finish_batch

    async def lost(*args: Any, **kw: Any) -> None:
        raise ConnectionResetError("connection to the database was lost")

    async with worker_ctx(settings, pool, clock) as ctx:
        monkeypatch.setattr(repo, "finish_batch", lost)
        assert await run_outbox_job(ctx, emitted.outbox_job_ids[0]) == "pending"
        monkeypatch.setattr(repo, "finish_batch", real_finish)
        row = await delivery_of(pool, listener_id)
        assert (row.status.value, row.attempts) == ("PENDING", 1)
        first_time = clock.now()
        clock.advance(timedelta(seconds=30))
        assert await next_attempt(ctx, pool, clock, row.id) == "done"
    row = await delivery_of(pool, listener_id)
    assert (row.status.value, row.attempts) == ("DELIVERED", 2)
    first, second = listener.received
    assert first.event_id == second.event_id == emitted.event_id
    assert first.body == second.body
    assert [r.headers["promo-delivery-attempt"] for r in (first, second)] == ["1", "2"]
    assert first.headers["promo-timestamp"] == str(int(first_time.timestamp()))
    assert second.headers["promo-timestamp"] == str(int(clock.now().timestamp()))
    assert (first.duplicate, second.duplicate) == (False, True)
    assert len(listener.processed) == 1
    one, two = await attempts_of(pool, row.id)
    assert one.error == "interrupted: the worker stopped before recording a result"
    assert (two.status_code, two.error) == (200, None)


async def test_a_listener_deactivated_mid_attempt_gets_no_further_attempt(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """docs/webhooks.md: "If the listener is inactive or unregistered when an attempt comes up,
    the delivery is CANCELLED without a request." Deactivated while attempt 1 is in flight, which
    then gets 503: the retry comes up, no request is made, CANCELLED ("listener inactive")."""
    release = asyncio.Event()

    async def slow_503(raw: RawListener, _: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        await release.wait()
        await raw.write(writer, b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")

    raw = await RawListener(slow_503).start()
    try:
        listener_id = await add_listener(pool, raw.url, clock.now())
        emitted = await emit(pool, clock)
        async with worker_ctx(settings, pool, clock) as ctx:
            task = asyncio.create_task(run_outbox_job(ctx, emitted.outbox_job_ids[0]))
            for _ in range(200):
                if raw.requests:
                    break
                await asyncio.sleep(0.01)
            async with pool.acquire() as conn:
                await repo.update_listener(conn, listener_id, now=clock.now(), active=False)
            release.set()
            await asyncio.wait_for(task, 5)
            row = await delivery_of(pool, listener_id)
            assert (row.status.value, row.last_status_code) == ("PENDING", 503)
            await next_attempt(ctx, pool, clock, row.id)
    finally:
        await raw.stop()
    row = await delivery_of(pool, listener_id)
    assert (row.status.value, row.attempts, row.last_error) == ("CANCELLED", 1,
                                                                "listener inactive")
    assert row.next_attempt_at is None
    assert len(raw.requests) == 1


# ---------------------------------------------------------------------------------------------
# 4. Payloads: every event type from its real emitter, against the documented schema
# ---------------------------------------------------------------------------------------------

TIME = "time"
DECIMAL = "decimal"
DOCUMENTED: dict[int, dict[str, Any]] = {
    5: {"campaign_id": str, "name": str, "promotion_codes": list, "clearance_required_by": TIME,
        "target_count": int},
    100: {"campaign_id": str, "name": str, "promotion_codes": list, "executed_at": TIME,
          "approved_count": int, "rejected_count": int, "conditional_execution": bool},
    101: {"promotion_code": str, "alert": str, "remaining": int, "used": int, "total": int,
          "threshold": str, "level": int, "raised_at": TIME},
    102: {"promotion_code": str, "alert": str, "remaining": int, "used": int, "total": int,
          "fallback_code_active": bool, "promotion_paused": bool, "raised_at": TIME},
    103: {"promotion_code": str, "alert": str, "fallback_code": str, "remaining": int,
          "used": int, "total": int, "raised_at": TIME},
    110: {"bonus_id": str, "formula_id": str, "customer_id": str, "reason": str},
    111: {"bonus_id": str, "formula_id": str, "customer_id": str, "result_type": str,
          "amount": DECIMAL, "currency": str, "period_start": TIME, "period_end": TIME,
          "requires_approval": bool},
    112: {"bonus_id": str, "formula_id": str, "customer_id": str, "result_type": str,
          "amount": DECIMAL, "currency": str, "issued_at": TIME},
}
SUSPICIOUS_KEYS = re.compile(r"secret|password|token|api_?key|_pk$|^pk$|listener_id|"
                             r"delivery_id|outbox|internal", re.IGNORECASE)


def _floats(text: str) -> list[str]:
    found: list[str] = []

    def keep(number: str) -> float:
        found.append(number)
        return 0.0

    json.loads(text, parse_float=keep)
    return found


def _is_time(value: Any) -> bool:
    if not isinstance(value, str):
        return False
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        return False
    return parsed.tzinfo is not None and re.search(r"(Z|[+-]\d\d:\d\d)$", value) is not None


async def _drain(ctx: dict[str, Any], pool: asyncpg.Pool, clock: FixedClock) -> None:
    """Run every due outbox job (campaign, bonus batch, delivery) until none is due."""
    for _ in range(20):
        async with pool.acquire() as conn:
            due = [r["id"] for r in await conn.fetch(
                "SELECT id FROM outbox_jobs WHERE status = 'pending' AND due_at <= $1"
                " ORDER BY id", clock.now())]
        if not due:
            return
        for job_id in due:
            await run_outbox_job(ctx, job_id)
    raise AssertionError("outbox jobs keep falling due")


async def test_every_event_type_from_its_emitter_matches_the_documented_schema(
        api: Api, settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener) -> None:
    """docs/webhooks.md "Event types" and "What a listener receives": for 5, 100, 101, 102, 103,
    110, 111 and 112 from the real emitters (a conditional campaign notified and executed, a
    personalized code pool crossing its threshold, running out and falling back, a dynamic bonus
    skipped, calculated and issued): the envelope keys in order, Promo-Event-Type equal to the
    body's type, every documented data key with its documented type, money as decimal strings
    (no JSON number with a fraction anywhere), times ISO 8601 with an offset, no secret or
    internal id, and the exact values the flows imply."""
    for event_type in DOCUMENTED:
        await add_listener(pool, listener.url, clock.now(), event_type=EventType(event_type))
    start = clock.now()
    async with worker_ctx(settings, pool, clock) as ctx:
        # Campaign: notified 30 min before, one of three customers approved, executed.
        await reward_type(api)
        await promotion(api)
        execute_at = start + timedelta(hours=2)
        await create_campaign(api, "spring", execute_at, customers=["c-1", "c-2", "c-3"])
        clock.set(execute_at - timedelta(minutes=30))
        await _drain(ctx, pool, clock)
        await set_statuses(api, "spring", {"c-1": True, "c-2": False}, "approve-1")
        clock.set(execute_at)
        await _drain(ctx, pool, clock)
        # Code pool: 3 codes, alert at 2 left, a fallback code.
        await code_promotion(api, "POOL", fallback="FALLBACK1",
                             alerts=[ppb.CodeAlertThreshold(remaining_codes=2)])
        await upload(api, "POOL", codes_file("PL", 3), "u1")
        for i in range(4):  # remaining 2 (threshold), 1, 0 (depleted), then the fallback
            await get_reward(api, f"p{i}", "POOL")
        for _ in range(200):
            if await pool.fetchval("SELECT count(*) FROM code_pool_alerts"
                                   " WHERE emitted_at IS NULL") == 0:
                break
            await asyncio.sleep(0.02)
        await _drain(ctx, pool, clock)
        # Dynamic bonus: b1 deposited (calculated and issued), b2 did not (skipped).
        await create_bonus_definition(api, bonus_definition(
            "deposit-10", "sum(deposit.amount) * 10%", rounding=ppb.ROUNDING_MODE_ROUND,
            decimals=2))
        await upsert_customers(api, ("b1", "EUR", "Europe/Berlin"), ("b2", "EUR", "UTC"))
        await record_events(api, "dep", ("b1", "deposit", "25", clock.now() - timedelta(hours=1),
                                         {}))
        await request_bonus(api, "deposit-10", ["b1", "b2"], "bonus-1")
        clock.advance(timedelta(minutes=10))
        await _drain(ctx, pool, clock)

    bodies: dict[int, list[dict[str, Any]]] = {}
    for got in listener.received:
        assert got.verify_error is None
        raw_text = got.body.decode()
        document = json.loads(raw_text)
        assert list(document) == ["event_id", "event_type", "occurred_at", "data"]
        assert got.headers["promo-event-type"] == str(document["event_type"])
        assert got.headers["promo-event-id"] == document["event_id"]
        assert _is_time(document["occurred_at"]), document["occurred_at"]
        assert _floats(raw_text) == [], raw_text
        assert SECRET not in raw_text
        assert not [k for k in document["data"] if SUSPICIOUS_KEYS.search(k)], document["data"]
        bodies.setdefault(document["event_type"], []).append(document["data"])
    assert sorted(bodies) == sorted(DOCUMENTED)
    problems: list[str] = []
    for event_type, schema in DOCUMENTED.items():
        for data in bodies[event_type]:
            for key, kind in schema.items():
                value = data.get(key, "<missing>")
                if kind == TIME:
                    ok = _is_time(value)
                elif kind == DECIMAL:
                    ok = isinstance(value, str) and bool(re.fullmatch(r"-?\d+(\.\d+)?", value))
                else:
                    ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
                if not ok:
                    problems.append(f"{event_type}.{key} = {value!r}")
    assert problems == []

    [notified] = bodies[5]
    assert notified == {"campaign_id": "spring", "name": "Campaign spring",
                        "promotion_codes": ["VIP25"],
                        "clearance_required_by": execute_at.isoformat(), "target_count": 3}
    [executed] = bodies[100]
    assert {k: executed[k] for k in DOCUMENTED[100]} == {
        "campaign_id": "spring", "name": "Campaign spring", "promotion_codes": ["VIP25"],
        "executed_at": execute_at.isoformat(), "approved_count": 1, "rejected_count": 2,
        "conditional_execution": True}
    [threshold] = bodies[101]
    assert {k: threshold[k] for k in DOCUMENTED[101] if k != "raised_at"} == {
        "promotion_code": "POOL", "alert": "THRESHOLD", "remaining": 2, "used": 1, "total": 3,
        "threshold": "2", "level": 2}
    [depleted] = bodies[102]
    assert {k: depleted[k] for k in DOCUMENTED[102] if k != "raised_at"} == {
        "promotion_code": "POOL", "alert": "DEPLETED", "remaining": 0, "used": 3, "total": 3,
        "fallback_code_active": True, "promotion_paused": False}
    [fallback] = bodies[103]
    assert {k: fallback[k] for k in DOCUMENTED[103] if k != "raised_at"} == {
        "promotion_code": "POOL", "alert": "FALLBACK_ACTIVE", "fallback_code": "FALLBACK1",
        "remaining": 0, "used": 3, "total": 3}
    [skipped] = bodies[110]
    assert (skipped["customer_id"], skipped["formula_id"], skipped["reason"]) == (
        "b2", "deposit-10", "NO_MATCHING_TRANSACTIONS")
    assert "amount" not in skipped and "currency" not in skipped
    [calculated] = bodies[111]
    [issued] = bodies[112]
    assert (calculated["customer_id"], calculated["result_type"], calculated["amount"],
            calculated["currency"], calculated["requires_approval"]) == (
        "b1", "AMOUNT", "2.50", "EUR", False)
    assert (issued["bonus_id"], issued["amount"], issued["currency"]) == (
        calculated["bonus_id"], "2.50", "EUR")
    assert Decimal(issued["amount"]) == Decimal("2.5")
    assert datetime.fromisoformat(issued["issued_at"]) == clock.now()
