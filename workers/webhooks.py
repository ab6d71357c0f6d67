"""Event delivery: the outbox handler for kind ``webhook.deliver``, for webhook and e-mail
listeners alike.

Each delivery has its own outbox job (the durable record the sweeper re-queues from), but a
worker does not make one round trip after another per delivery: the job that runs claims up to
PROMO_WEBHOOK_BATCH_SIZE - 1 other due delivery jobs besides its own (FOR UPDATE SKIP LOCKED, one
statement), logs all their attempts as started (one statement), releases the connection (never
hold one while calling a peer), sends them concurrently (at most PROMO_WEBHOOK_CONCURRENCY sends
in flight per worker process, three quarters of them at most to one listener host:
send_slots.py),
and records the results as the sends finish, those finishing together in one statement. The arq
jobs of the deliveries it took along find their job in flight or done and do nothing.

Per delivery, nothing changed: each attempt reads the listener's current URL (or recipients) and
secret; retryable failures (timeouts, connection errors, 5xx, 408, 425, 429; SMTP 4xx) go back
to pending with exponential backoff; a refusal (other 4xx, 3xx; SMTP 5xx) fails the delivery;
the end of the retry budget (PROMO_WEBHOOK_MAX_ATTEMPTS or the deadline) makes it DEAD. The
caller's own job reports its outcome to the outbox runner as before (return, DeliveryRetry or
PermanentJobError); the others' outbox rows are settled here with the runner's rules. Delivery
is at least once: a worker that dies mid-batch leaves the claimed jobs leased, they fall due
again when the lease runs out, the sweeper queues them, and a listener may see a Promo-Event-Id
twice.

``setup``/``teardown`` create and close the worker's one HTTP client (connection reuse) and its
send slots; the worker's on_startup/on_shutdown call them.

Secrets are stored sealed (core/secret_box.py) once a key is configured; each send opens the
current (and, in its grace period, the previous) secret with the worker's keys. A current secret
that no configured key opens is never replaced by sending unsigned: the attempt is recorded as a
retryable failure naming the key id, so the delivery goes out once the key is back, or once the
listener has a new secret (or ends DEAD as any failing delivery does). An unreadable previous
secret is only left out of the signature, with a warning.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
import time
import urllib.request
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import urlsplit

import h11
import httpx

from config.settings import Settings
from core.clock import Clock
from core.events import Channel, DeliveryStatus, Outcome, classify_status
from core.secret_box import SecretBox, SecretBoxError
from core.text import storable
from core.webhook_signature import (
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    signature_header,
)
from storage import webhooks as repo
from storage.listener_secrets import LISTENER_SECRET_PURPOSE
from storage.outbox import OutboxJob
from storage.queue import fresh_arming, queue_outbox_job
from workers import email, metrics
from workers.delivery_lane import LANE_KEY, DeliveryLane, delivery_job_limit
from workers.outbox import JobAlreadyRunning, JobDeferred, backoff_seconds, job_lease
from workers.registry import SWEEP_CAPS, PermanentJobError, handler
from workers.send_slots import SendSlots

log = logging.getLogger("promo.webhooks")

HTTP_CLIENT_KEY = "webhook_http"
SLOTS_KEY = "webhook_slots"
SECRET_BOX_KEY = "secret_box"
USER_AGENT = "promo-engine-webhooks/1"
HEADER_DELIVERY_ID = "Promo-Delivery-Id"
HEADER_DELIVERY_ATTEMPT = "Promo-Delivery-Attempt"
# How much of a failed answer's body is kept in the delivery log.
RESPONSE_SNIPPET_BYTES = 512
# How long one worker job keeps claiming further chunks of due deliveries.
CLAIM_WINDOW_SECONDS = 30.0


def http_timeout(settings: Settings) -> float:
    """The webhook timeout, but at most half the outbox lease: an attempt still waiting for its
    answer must not be queued again by the sweeper (two concurrent attempts of one delivery)."""
    return min(settings.webhook_timeout_seconds, settings.job_lease_seconds / 2)


def smtp_timeout(settings: Settings) -> float:
    """The SMTP timeout, bounded by half the lease for the same reason."""
    return min(settings.smtp_timeout_seconds, settings.job_lease_seconds / 2)


class DeliveryRetry(Exception):
    """A transient failure; the outbox records it and retries at ``retry_at`` (the backoff,
    kept before the delivery's deadline), or with its own backoff when that is None."""

    def __init__(self, message: str | None, retry_at: datetime | None = None, *,
                 not_made: bool = False) -> None:
        super().__init__(message)
        self.retry_at = retry_at
        # No request was made and the attempt was given back: the retry is queued under an id
        # of its own (storage.queue.outbox_job_id's ``arming``), not this run's.
        self.not_made = not_made


async def setup(ctx: dict[str, Any]) -> Http11Client | httpx.AsyncClient:
    """Create the worker's HTTP client and send slots (inside the worker's loop), kept in ctx.

    With a proxy in the environment (HTTPS_PROXY, HTTP_PROXY, ALL_PROXY) every POST goes
    through httpx, which honours them (and NO_PROXY) exactly as before."""
    settings: Settings = ctx["settings"]
    fallback = httpx.AsyncClient(
        timeout=httpx.Timeout(http_timeout(settings)),
        # A signed POST is never forwarded: a redirect is reported, not followed.
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
        limits=httpx.Limits(max_connections=settings.webhook_concurrency,
                            max_keepalive_connections=settings.webhook_concurrency))
    proxied = any(key in ("http", "https", "all") for key in urllib.request.getproxies())
    client: Http11Client | httpx.AsyncClient = fallback if proxied else Http11Client(
        ssl_context=httpx.create_ssl_context(), max_idle=settings.webhook_concurrency,
        fallback=fallback)
    ctx[HTTP_CLIENT_KEY] = client
    ctx[SLOTS_KEY] = SendSlots(settings.webhook_concurrency)
    ctx[LANE_KEY] = DeliveryLane(delivery_job_limit(settings.worker_max_jobs))
    return client


async def teardown(ctx: dict[str, Any]) -> None:
    ctx.pop(SLOTS_KEY, None)
    ctx.pop(LANE_KEY, None)
    client: Http11Client | httpx.AsyncClient | None = ctx.pop(HTTP_CLIENT_KEY, None)
    if client is not None:
        await client.aclose()


def secret_box(ctx: dict[str, Any]) -> SecretBox:
    """The worker's box (set by on_startup; else made once from the settings)."""
    box: SecretBox | None = ctx.get(SECRET_BOX_KEY)
    if box is None:
        settings: Settings = ctx["settings"]
        box = ctx[SECRET_BOX_KEY] = settings.secret_box()
    return box


def _secrets(work: repo.DeliveryWork, box: SecretBox, *, now: datetime,
             grace: timedelta) -> list[str]:
    """The current secret, plus the previous one during the grace period after a rotation,
    opened. Raises SecretBoxError when the current one does not open.

    Only the current secret is required. A previous secret no configured key opens is left out
    (with a warning): rotating to a new secret is the documented way out of a lost key, and the
    unreadable old value must not block the new one for the whole grace period. A listener
    still verifying with the old secret then rejects the signature, which it would have to
    learn about anyway."""
    assert work.secret is not None
    current = box.open(work.secret, purpose=LISTENER_SECRET_PURPOSE)
    keys = [current]
    if (work.previous_secret and work.secret_rotated_at is not None
            and now - work.secret_rotated_at < grace):
        try:
            previous = box.open(work.previous_secret, purpose=LISTENER_SECRET_PURPOSE)
        except SecretBoxError as exc:  # the message names a key id, never the secret
            log.warning("webhook signed without the listener's previous secret: it cannot be "
                        "opened", extra={"delivery_id": work.delivery_id,
                                         "listener_id": work.listener_id, "error": str(exc)})
        else:
            if previous != current:
                keys.append(previous)
    return keys


def _deadline(work: repo.DeliveryWork, settings: Settings) -> datetime:
    if work.deliver_by is not None:
        return work.deliver_by
    assert work.run_started_at is not None
    return work.run_started_at + timedelta(seconds=settings.webhook_deadline_seconds)


async def _snippet(response: httpx.Response) -> str:
    chunks: list[bytes] = []
    size = 0
    async for chunk in response.aiter_bytes():
        chunks.append(chunk)
        size += len(chunk)
        if size >= RESPONSE_SNIPPET_BYTES:
            break
    return b"".join(chunks)[:RESPONSE_SNIPPET_BYTES].decode(errors="replace").strip()


async def _post(client: httpx.AsyncClient, url: str, body: bytes, headers: dict[str, str],
                limit_seconds: float) -> tuple[int | None, str | None, Outcome]:
    """One POST: (status code, error text or None, outcome). Never raises for network trouble."""
    try:
        # httpx's timeout is per phase; this bounds the whole exchange (a slow-dripping peer).
        async with asyncio.timeout(limit_seconds), client.stream(
                "POST", url, content=body, headers=headers) as response:
            code = response.status_code
            outcome = classify_status(code)
            if outcome is Outcome.DELIVERED:
                return code, None, outcome
            snippet = await _snippet(response)
            if 300 <= code < 400:
                where = response.headers.get("location", "?")
                return code, (f"HTTP {code}: redirected to {where}; redirects are not followed, "
                              "register the final URL"), outcome
            return code, f"HTTP {code}: {snippet}" if snippet else f"HTTP {code}", outcome
    except (TimeoutError, httpx.TimeoutException) as exc:
        return None, f"timeout after {limit_seconds:g} s ({type(exc).__name__})", Outcome.RETRY
    except (httpx.UnsupportedProtocol, httpx.InvalidURL) as exc:
        return None, f"{type(exc).__name__}: {exc}", Outcome.REJECTED
    except httpx.HTTPError as exc:  # connection refused/reset, DNS, protocol errors
        return None, f"{type(exc).__name__}: {exc or 'connection failed'}", Outcome.RETRY


# The HTTP client. httpx costs ~1 ms of CPU per POST here and more with many requests in
# flight (its pool scans every connection per request); a batch of 1,000 deliveries spent 70% of
# the worker's time in it. POSTs go out through h11 (the HTTP/1.1 state machine httpx is built
# on) over asyncio streams instead: ~0.15 ms each, flat in the number in flight. httpx stays for
# what the fast path does not do: proxies from the environment and URLs that need encoding.

Origin = tuple[str, str, int]  # scheme, host, port
# A 2xx answer's body is read (so the connection can be reused) up to this size; beyond it the
# connection is closed instead.
MAX_DRAINED_BODY_BYTES = 64 * 1024
KEEPALIVE_SECONDS = 5.0  # as httpx: an idle connection older than this is not reused


class _StaleConnection(Exception):
    """A kept-alive connection failed before any answer: the peer had closed it."""


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    state: h11.Connection
    idle_since: float = 0.0

    def usable(self, now: float) -> bool:
        return (now - self.idle_since < KEEPALIVE_SECONDS and not self.reader.at_eof()
                and not self.writer.is_closing())

    def close(self) -> None:
        self.writer.close()


@dataclass(frozen=True)
class _Target:
    origin: Origin
    path: str  # path and query, as sent in the request line
    host: str  # the Host header


def _parse_target(url: str) -> _Target | None:
    """The fast path's view of a URL; None for what it leaves to httpx (any URL that is not
    plain ASCII http(s), so httpx encodes it or reports it exactly as before)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = parts.hostname
    if scheme not in ("http", "https") or not host or not url.isascii():
        return None
    default = 443 if scheme == "https" else 80
    shown = f"[{host}]" if ":" in host else host
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return _Target((scheme, host, port or default), path,
                   shown if port in (None, default) else f"{shown}:{port}")


class Http11Client:
    """POSTs over HTTP/1.1 with kept-alive connections per origin (at most ``max_idle`` idle
    ones each). Never follows redirects. Never raises for network trouble."""

    def __init__(self, *, ssl_context: ssl.SSLContext, max_idle: int,
                 fallback: httpx.AsyncClient) -> None:
        self._ssl = ssl_context
        self._max_idle = max_idle
        self._idle: dict[Origin, list[_Connection]] = {}
        self._targets: dict[str, _Target | None] = {}
        self._pruned_at = time.monotonic()
        self.fallback = fallback

    def _target(self, url: str) -> _Target | None:
        if url not in self._targets:
            if len(self._targets) > 10_000:
                self._targets.clear()
            self._targets[url] = _parse_target(url)
        return self._targets[url]

    def _prune(self, now: float) -> None:
        """Close the idle connections of every origin that are past KEEPALIVE_SECONDS or that
        the listener closed, and forget origins left with none: a listener no longer posted
        to (moved, unregistered) would otherwise keep its sockets, in CLOSE_WAIT once it hangs
        up, for the worker's whole life. At most once per KEEPALIVE_SECONDS."""
        if now - self._pruned_at < KEEPALIVE_SECONDS:
            return
        self._pruned_at = now
        for origin, idle in list(self._idle.items()):
            kept = []
            for conn in idle:
                if conn.usable(now):
                    kept.append(conn)
                else:
                    conn.close()
            if kept:
                self._idle[origin] = kept
            else:
                del self._idle[origin]

    async def _connect(self, origin: Origin) -> tuple[_Connection, bool]:
        """An idle connection to ``origin`` (reused: True) or a new one."""
        now = time.monotonic()
        self._prune(now)
        idle = self._idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.usable(now):
                return conn, True
            conn.close()
        scheme, host, port = origin
        tls = scheme == "https"
        reader, writer = await asyncio.open_connection(
            host, port, ssl=self._ssl if tls else None, server_hostname=host if tls else None)
        return _Connection(reader, writer, h11.Connection(h11.CLIENT)), False

    def _release(self, origin: Origin, conn: _Connection) -> None:
        state = conn.state
        if state.our_state is h11.DONE and state.their_state is h11.DONE:
            idle = self._idle.setdefault(origin, [])
            if len(idle) < self._max_idle:
                state.start_next_cycle()
                conn.idle_since = time.monotonic()
                idle.append(conn)
                return
        conn.close()

    async def _exchange(self, conn: _Connection, target: _Target, body: bytes,
                        headers: list[tuple[str, str]], seen: list[int]) -> tuple[int, str, bytes]:
        """Send the request, read the answer: (status, Location header, first body bytes).
        The status goes into ``seen`` as soon as it is read, so that a body cut short or too
        slow after it still counts (a 2xx is the listener's answer, as for httpx)."""
        state = conn.state
        data = state.send(h11.Request(method="POST", target=target.path, headers=headers))
        data = (data or b"") + (state.send(h11.Data(data=body)) or b"")
        data += state.send(h11.EndOfMessage()) or b""
        try:
            conn.writer.write(data)
            await conn.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise _StaleConnection from exc
        status, location, head, size, answered = 0, "", bytearray(), 0, False
        while True:
            event = state.next_event()
            if event is h11.NEED_DATA:
                try:
                    chunk = await conn.reader.read(65536)
                except (ConnectionError, OSError) as exc:
                    if not answered:
                        raise _StaleConnection from exc
                    raise
                if not chunk and not answered:
                    raise _StaleConnection
                answered = True
                state.receive_data(chunk)
            elif isinstance(event, h11.Response):
                status = event.status_code
                seen.append(status)
                location = next((v.decode("latin-1") for k, v in event.headers
                                 if k == b"location"), "")
            elif isinstance(event, h11.Data):
                size += len(event.data)
                if len(head) < RESPONSE_SNIPPET_BYTES:
                    head += event.data[:RESPONSE_SNIPPET_BYTES - len(head)]
                if size > MAX_DRAINED_BODY_BYTES or (
                        status >= 300 and len(head) >= RESPONSE_SNIPPET_BYTES):
                    return status, location, bytes(head)  # enough: the connection closes
            elif isinstance(event, h11.EndOfMessage):
                return status, location, bytes(head)
            elif isinstance(event, h11.ConnectionClosed):
                raise h11.RemoteProtocolError("the server closed the connection mid-answer")
            # InformationalResponse (1xx): keep reading

    async def post(self, url: str, body: bytes, headers: dict[str, str],
                   limit_seconds: float) -> tuple[int | None, str | None, Outcome]:
        """One POST: (status code, error text or None, outcome)."""
        target = self._target(url)
        if target is None:
            return await _post(self.fallback, url, body, headers, limit_seconds)
        request_headers = [("Host", target.host), ("User-Agent", USER_AGENT), ("Accept", "*/*"),
                           ("Content-Length", str(len(body))), *headers.items()]
        conn: _Connection | None = None
        seen: list[int] = []  # the status line, once read
        try:
            async with asyncio.timeout(limit_seconds):
                while True:
                    try:
                        conn, reused = await self._connect(target.origin)
                    except (OSError, ssl.SSLError) as exc:
                        return None, f"ConnectError: {exc or 'connection failed'}", Outcome.RETRY
                    try:
                        code, location, head = await self._exchange(conn, target, body,
                                                                     request_headers, seen)
                        break
                    except _StaleConnection:
                        conn.close()
                        conn = None
                        if reused:
                            continue  # the peer closed it while idle: once more, on a new one
                        return None, ("RemoteProtocolError: Server disconnected without sending "
                                      "a response."), Outcome.RETRY
            self._release(target.origin, conn)
            conn = None
        except TimeoutError as exc:
            if seen and classify_status(seen[-1]) is Outcome.DELIVERED:
                return seen[-1], None, Outcome.DELIVERED  # only the body was slow
            return None, f"timeout after {limit_seconds:g} s ({type(exc).__name__})", Outcome.RETRY
        except (h11.ProtocolError, ConnectionError, OSError) as exc:
            if seen and classify_status(seen[-1]) is Outcome.DELIVERED:
                return seen[-1], None, Outcome.DELIVERED  # only the body was cut short
            return None, f"{type(exc).__name__}: {exc or 'connection failed'}", Outcome.RETRY
        finally:
            if conn is not None:  # timed out, failed or cancelled mid-exchange
                conn.close()
        outcome = classify_status(code)
        if outcome is Outcome.DELIVERED:
            return code, None, outcome
        if 300 <= code < 400:
            return code, (f"HTTP {code}: redirected to {location or '?'}; redirects are not "
                          "followed, register the final URL"), outcome
        snippet = head.decode(errors="replace").strip()
        return code, f"HTTP {code}: {snippet}" if snippet else f"HTTP {code}", outcome

    async def aclose(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
        await self.fallback.aclose()


@dataclass(frozen=True)
class _Sent:
    status_code: int | None
    error: str | None
    outcome: Outcome
    latency_ms: float
    finished_at: datetime
    # False when no request was made (no free send slot in time): not an attempt, so it is not
    # counted towards PROMO_WEBHOOK_MAX_ATTEMPTS and leaves no line in the attempt log.
    made: bool = True


async def _send_webhook(ctx: dict[str, Any], work: repo.DeliveryWork, attempt: int,
                        sent_at: datetime) -> tuple[int | None, str | None, Outcome]:
    settings: Settings = ctx["settings"]
    client: Http11Client | httpx.AsyncClient = ctx.get(HTTP_CLIENT_KEY) or await setup(ctx)
    assert work.listener_url is not None and work.delivery_id is not None
    try:
        secrets = _secrets(work, secret_box(ctx), now=sent_at,
                           grace=timedelta(seconds=settings.webhook_secret_grace_seconds))
    except SecretBoxError as exc:
        # Never unsigned: a retry, so the delivery goes out once the key is configured again.
        log.error("webhook not sent: the listener's secret cannot be opened", extra={
            "delivery_id": work.delivery_id, "listener_id": work.listener_id,
            "error": str(exc)})
        return None, f"not sent: {exc}", Outcome.RETRY
    timestamp = int(sent_at.timestamp())
    headers = {
        "Content-Type": "application/json",
        HEADER_EVENT_ID: work.event_id,
        HEADER_EVENT_TYPE: str(work.event_type),
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_SIGNATURE: signature_header(secrets, timestamp, work.body),
        HEADER_DELIVERY_ID: str(work.delivery_id),
        HEADER_DELIVERY_ATTEMPT: str(attempt),
    }
    if isinstance(client, Http11Client):
        return await client.post(work.listener_url, work.body, headers, http_timeout(settings))
    return await _post(client, work.listener_url, work.body, headers, http_timeout(settings))


async def _send_email(ctx: dict[str, Any], work: repo.DeliveryWork, attempt: int,
                      sent_at: datetime) -> tuple[int | None, str | None, Outcome]:
    settings: Settings = ctx["settings"]
    assert work.delivery_id is not None
    result = await email.send(
        settings, email.EmailJob(delivery_id=work.delivery_id, attempt=attempt,
                                 event_id=work.event_id, event_type=work.event_type,
                                 body=work.body, recipients=work.email_recipients),
        sent_at_header=email.date_header(sent_at), limit_seconds=smtp_timeout(settings))
    return result.code, result.error, result.outcome


def _slot_key(work: repo.DeliveryWork) -> tuple[str, object]:
    """Whose share of the send slots a send takes (send_slots.py): a webhook's host (listeners
    on one hung host share one share), an e-mail listener's own id (all e-mail goes through one
    relay, so the relay is not the unit)."""
    if work.channel is Channel.EMAIL or work.listener_url is None:
        return ("listener", work.listener_id)
    parts = urlsplit(work.listener_url)
    try:
        port = parts.port
    except ValueError:  # not a URL a send can reach: its own listener, as for e-mail
        return ("listener", work.listener_id)
    scheme = parts.scheme.lower()
    port = port or (443 if scheme == "https" else 80)
    return ("host", f"{scheme}://{(parts.hostname or '').lower()}:{port}")


async def _send(ctx: dict[str, Any], work: repo.DeliveryWork, attempt: int,
                start_by: float) -> _Sent:
    """One attempt over the listener's channel, in one of the worker's send slots. A send that
    gets no slot before ``start_by`` (monotonic) is not made, so a batch always ends well within
    its lease: the delivery is retried shortly, and the attempt it was logged as is taken back
    (the listener did nothing wrong: other hosts' sends held the slots)."""
    clock: Clock = ctx["clock"]
    if SLOTS_KEY not in ctx:
        await setup(ctx)
    slots: SendSlots = ctx[SLOTS_KEY]
    try:
        async with asyncio.timeout(max(0.0, start_by - time.monotonic())):
            await slots.acquire(_slot_key(work))
    except TimeoutError:
        return _Sent(None, NOT_SENT_ERROR, Outcome.RETRY, 0.0, clock.now(), made=False)
    try:
        sent_at = clock.now()
        started = time.perf_counter()
        try:
            if work.channel is Channel.EMAIL:
                code, error, outcome = await _send_email(ctx, work, attempt, sent_at)
            else:
                code, error, outcome = await _send_webhook(ctx, work, attempt, sent_at)
        except Exception as exc:  # a bug must not lose the batch's other results
            log.exception("delivery send failed unexpectedly",
                          extra={"delivery_id": work.delivery_id})
            code, error, outcome = None, f"internal error: {type(exc).__name__}: {exc}", \
                Outcome.RETRY
        latency_ms = round((time.perf_counter() - started) * 1000, 3)
        return _Sent(code, error, outcome, latency_ms, clock.now())
    finally:
        slots.release(_slot_key(work))


NOT_SENT_ERROR = ("not sent: no free send slot in time (the worker is busy); retried, not "
                  "counted as an attempt")


def _close(work: repo.DeliveryWork, now: datetime, settings: Settings) -> repo.Closing | None:
    """A claimed job that ends without a send, or None when it is to be attempted."""
    if work.delivery_id is None:
        return repo.Closing(work, None, "dead",
                            f"webhook job {work.job_id} points at no webhook delivery")
    if work.status is DeliveryStatus.CANCELLED and work.outbox_job_id == work.job_id:
        # Cancelled while this job waited (the listener unregistered, its campaign cancelled):
        # nothing to do, but this job is the one that counts it.
        return repo.Closing(work, None, "done", None, closed_before=DeliveryStatus.CANCELLED)
    if work.status is not DeliveryStatus.PENDING or work.outbox_job_id != work.job_id:
        # Finished, or superseded by a redelivery's job: nothing to do.
        return repo.Closing(work, None, "done", None)
    if work.listener_id is None or work.listener_url is None or not work.listener_active:
        unregistered = work.listener_url is None
        why = "listener unregistered" if unregistered else "listener inactive"
        return repo.Closing(work, DeliveryStatus.CANCELLED, "done", why)
    deadline = _deadline(work, settings)
    if now >= deadline:
        return repo.Closing(work, DeliveryStatus.DEAD, "dead",
                            f"deadline {deadline.isoformat()} passed before the attempt")
    return None


def _longest_wait(work: repo.DeliveryWork, deadline: datetime, settings: Settings) -> float:
    """The cap on one wait between attempts: PROMO_WEBHOOK_RETRY_MAX_SECONDS (an hour), and
    never more than a tenth of the delivery's whole window, so a listener that comes back gets
    the event within a tenth of it: 3 minutes of a scheduled campaign's 30-minute lead (whose
    deadline is the execution), not an hour later, past the point of approving anything."""
    started = work.run_started_at or deadline
    window = (deadline - started).total_seconds()
    return max(settings.job_retry_base_seconds,
               min(settings.webhook_retry_max_seconds, window / 10))


def _result(work: repo.DeliveryWork, attempt: int, sent: _Sent,
            settings: Settings) -> repo.AttemptResult:
    """What one send means for the delivery and its outbox job."""
    # The error may quote the listener's answer, NUL bytes included (a gzip-compressed error
    # page): PostgreSQL text cannot hold them, and the whole chunk's results would fail to record.
    error = None if sent.error is None else storable(sent.error)
    retry_at: datetime | None = None
    if sent.outcome is Outcome.DELIVERED:
        new_status, job_status = DeliveryStatus.DELIVERED, "done"
    elif sent.outcome is Outcome.REJECTED:
        new_status, job_status = DeliveryStatus.FAILED, "dead"
    else:
        # A send never made (no free slot in time) is no attempt: it cannot exhaust the
        # attempts, and it is retried soon, uncounted (the slots free up as sends finish). The
        # deadline bounds every retry.
        limit = min(work.job_max_attempts, settings.webhook_max_attempts)
        deadline = _deadline(work, settings)
        if sent.made and work.job_attempts >= limit:
            new_status, job_status = DeliveryStatus.DEAD, "dead"
            error = f"{error} (gave up after {work.job_attempts} attempts)"
        elif sent.finished_at >= deadline:
            new_status, job_status = DeliveryStatus.DEAD, "dead"
            error = f"{error} (deadline {deadline.isoformat()} passed)"
        else:
            new_status, job_status = DeliveryStatus.PENDING, "pending"
            delay = (backoff_seconds(work.job_attempts, base=settings.job_retry_base_seconds,
                                     maximum=_longest_wait(work, deadline, settings))
                     if sent.made else settings.job_retry_base_seconds)
            # Never announce a retry past the deadline (it would only go DEAD unsent): the
            # last one is made a second before it, so a listener back in time still gets it.
            retry_at = min(sent.finished_at + timedelta(seconds=delay),
                           max(deadline - timedelta(seconds=1), sent.finished_at))
    # The outbox row's last_error, worded as the outbox runner words its own job's.
    job_error = (f"listener refused the delivery: {error}" if job_status == "dead"
                 and new_status is DeliveryStatus.FAILED
                 else f"DeliveryRetry: {error}" if job_status == "pending" else error)
    return repo.AttemptResult(
        work=work, attempt=attempt, finished_at=sent.finished_at, status_code=sent.status_code,
        error=error, latency_ms=sent.latency_ms, new_status=new_status, job_status=job_status,
        retry_at=retry_at, job_error=job_error, counted=sent.made)


def _own_outcome(result: repo.AttemptResult | repo.Closing) -> Exception | None:
    """What the own job tells the outbox runner: nothing (done), or an exception."""
    if isinstance(result, repo.Closing):
        return PermanentJobError(result.error or "") if result.job_status == "dead" else None
    if result.new_status is DeliveryStatus.DELIVERED:
        return None
    if result.new_status is DeliveryStatus.FAILED:
        return PermanentJobError(f"listener refused the delivery: {result.error}")
    if result.new_status is DeliveryStatus.DEAD:
        return PermanentJobError(result.error or "")
    return DeliveryRetry(result.error, retry_at=result.retry_at, not_made=not result.counted)


async def _queue_retries(ctx: dict[str, Any], results: list[repo.AttemptResult]) -> None:
    """Queue the other jobs' retries in Redis (best effort: the sweeper finds them anyway)."""
    redis = ctx.get("redis")
    settings: Settings = ctx["settings"]
    if redis is None:
        return
    for result in results:
        if result.work.own or result.job_status != "pending" or result.retry_at is None:
            continue
        try:
            await queue_outbox_job(redis, job_id=result.work.job_id,
                                   attempts=result.work.job_attempts, due_at=result.retry_at,
                                   queue_name=settings.queue_name,
                                   arming="" if result.counted else fresh_arming(
                                       result.retry_at))
        except Exception:
            log.warning("could not queue a webhook retry; the sweeper will", exc_info=True,
                        extra={"outbox_job_id": result.work.job_id})


@dataclass
class _Chunk:
    """One claim's worth of deliveries, from the claim to the recorded results."""

    claimed: list[repo.DeliveryWork]
    closings: list[repo.Closing]
    sending: list[tuple[repo.DeliveryWork, int]]  # with their attempt numbers
    results: list[repo.AttemptResult]


async def _claim(ctx: dict[str, Any], *, own_job_id: int | None, limit: int) -> _Chunk:
    """Claim due delivery jobs and log their attempts as started: two statements."""
    settings: Settings = ctx["settings"]
    clock: Clock = ctx["clock"]
    now = clock.now()
    async with ctx["pool"].acquire() as conn:
        claimed = await repo.claim_batch(conn, own_job_id=own_job_id, now=now,
                                         lease=job_lease(settings), limit=limit)
        closings: list[repo.Closing] = []
        to_send: list[repo.DeliveryWork] = []
        for work in claimed:
            closing = _close(work, now, settings)
            if closing is None:
                to_send.append(work)
            else:
                closings.append(closing)
        started: dict[int, int] = {}
        if to_send or any(c.delivery_status is not None for c in closings):
            started = await repo.start_batch(conn, now=now, attempts=to_send, closings=closings)
    sending: list[tuple[repo.DeliveryWork, int]] = []
    for work in to_send:
        if work.delivery_id in started:
            sending.append((work, started[work.delivery_id]))
        else:  # stopped being pending between the claim and the start: not sent
            closings.append(repo.Closing(work, None, "done", None))
    return _Chunk(claimed, closings, sending, [])


class _Recorder:
    """Records a chunk's results as its sends finish, in as few statements as the timing
    allows: the first result to arrive is written at once, and whatever arrives while a write
    is running goes out together in the next one (group commit). A listener answering at once
    is therefore DELIVERED at once, not when the chunk's slowest send (a hung listener's, up to
    the timeout) is over; sends finishing together still cost one statement."""

    def __init__(self, ctx: dict[str, Any], chunk: _Chunk) -> None:
        self._ctx = ctx
        self._chunk = chunk
        self._waiting: list[repo.AttemptResult] = []
        self._closings = list(chunk.closings)  # written with the first results
        self._writing = asyncio.Lock()

    async def add(self, result: repo.AttemptResult) -> None:
        self._chunk.results.append(result)
        self._waiting.append(result)
        async with self._writing:
            results, closings = await self._write()
        await self._after(results, closings)

    async def close(self) -> None:
        """Write what is left (the closings of a chunk with nothing to send)."""
        async with self._writing:
            results, closings = await self._write()
        await self._after(results, closings)

    async def _write(self) -> tuple[list[repo.AttemptResult], list[repo.Closing]]:
        results, self._waiting = self._waiting, []
        closings, self._closings = self._closings, []
        if results or any(not c.work.own for c in closings):
            clock: Clock = self._ctx["clock"]
            async with self._ctx["pool"].acquire() as conn:
                await repo.finish_batch(conn, now=clock.now(), results=results,
                                        closings=closings,
                                        lease=job_lease(self._ctx["settings"]))
        return results, closings

    async def _after(self, results: list[repo.AttemptResult],
                     closings: list[repo.Closing]) -> None:
        """Queue the retries and count the results: outside the write lock, so a slow Redis
        does not hold the next results' statement back."""
        if results:
            await _queue_retries(self._ctx, results)
        if results or closings:
            metrics.record_deliveries(results, closings)


async def _complete(ctx: dict[str, Any], chunk: _Chunk, start_by: float) -> None:
    """Send a claimed chunk (no database connection held while sending), record the results as
    the sends finish (_Recorder), settle the outbox rows, and queue the retries."""
    settings: Settings = ctx["settings"]
    recorder = _Recorder(ctx, chunk)

    async def attempt_one(work: repo.DeliveryWork, attempt: int) -> None:
        sent = await _send(ctx, work, attempt, start_by)
        await recorder.add(_result(work, attempt, sent, settings))

    attempts = [asyncio.ensure_future(attempt_one(work, attempt))
                for work, attempt in chunk.sending]
    try:
        await asyncio.gather(*attempts)
    except BaseException:
        # A result could not be written (or the job is being stopped): stop the other sends
        # too; their jobs stay leased and fall due again, as a failed chunk's always did.
        for task in attempts:
            task.cancel()
        raise
    await recorder.close()


# The sweeper queues at most one lane's worth of delivery jobs per tick: each of them claims
# the other due deliveries, so a backlog of thousands needs no more, and thousands of queued
# delivery jobs would sit in front of every other job in arq's due-ordered queue.
SWEEP_CAPS[repo.DELIVER_KIND] = lambda settings: delivery_job_limit(settings.worker_max_jobs)


@handler(repo.DELIVER_KIND)
async def deliver(ctx: dict[str, Any], job: OutboxJob) -> None:
    """The outbox job ``job`` (payload {"delivery_id": ...}), and with it the other due delivery
    jobs: one attempt each.

    Claims go in chunks of PROMO_WEBHOOK_BATCH_SIZE, the first with the own job: each chunk's
    sends start as soon as it is claimed, the next chunk is claimed while they are in flight,
    and at most two chunks of one job are in flight (a third is claimed once the first of them
    is done). The job stops claiming when nothing more is due, or after
    CLAIM_WINDOW_SECONDS (so it ends well within arq's job timeout).

    Delivery jobs hold at most workers.delivery_lane's share of the worker's job slots; a job
    beyond it is put off a moment (its attempt given back), so a flood of deliveries to a slow
    listener never holds back the worker's other jobs (a campaign due meanwhile).
    """
    settings: Settings = ctx["settings"]
    try:
        int(job.payload["delivery_id"])
    except (KeyError, TypeError, ValueError):
        raise PermanentJobError(
            f"webhook job payload has no delivery_id: {job.payload!r}") from None
    lane: DeliveryLane | None = ctx.get(LANE_KEY)
    if lane is None:  # a context without setup (a test driving the handler alone)
        await _deliver(ctx, job)
        return
    if not lane.enter():
        raise JobDeferred(f"the worker's delivery jobs are at their limit ({lane.limit} of "
                          f"{settings.worker_max_jobs} job slots)",
                          retry_at=lane.retry_at(ctx["clock"].now()))
    try:
        await _deliver(ctx, job)
    finally:
        lane.leave()


async def _deliver(ctx: dict[str, Any], job: OutboxJob) -> None:
    settings: Settings = ctx["settings"]
    began = time.monotonic()
    start_by = began + job_lease(settings).total_seconds() / 2
    size = settings.webhook_batch_size
    first = await _claim(ctx, own_job_id=job.id, limit=size - 1)
    chunks = [first]
    tasks = [asyncio.create_task(_complete(ctx, first, start_by))]
    try:
        more = sum(not work.own for work in first.claimed) >= size - 1
        while more and time.monotonic() - began < CLAIM_WINDOW_SECONDS:
            if len(tasks) >= 2:
                # At most two chunks in flight: the one before the last must be done first.
                await tasks[-2]
            chunk = await _claim(ctx, own_job_id=None, limit=size)
            if not chunk.claimed:
                break
            more = len(chunk.claimed) >= size
            chunks.append(chunk)
            # Its sends start at once, beside the chunk before's (the send slots bound them):
            # a listener hanging in that chunk does not hold this one's deliveries back.
            tasks.append(asyncio.create_task(_complete(ctx, chunk, start_by)))
        await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        raise
    finally:
        _log_batch(job, chunks, began)
        metrics.record_batch(sum(len(c.claimed) for c in chunks), time.monotonic() - began)

    finished: list[repo.AttemptResult | repo.Closing] = [*first.results, *first.closings]
    own = next((r for r in finished if r.work.own), None)
    if own is None:
        # The own job was not among the claimed ones: another copy of its arq job has it.
        raise JobAlreadyRunning(f"outbox job {job.id} is in flight elsewhere")
    outcome = _own_outcome(own)
    if outcome is not None:
        raise outcome


def _log_batch(job: OutboxJob, chunks: list[_Chunk], began: float) -> None:
    """One line per job; one per failed attempt (successes only at DEBUG: the hot path)."""
    counts: dict[str, int] = {}
    claimed = 0
    for chunk in chunks:
        claimed += len(chunk.claimed)
        for result in chunk.results:
            counts[result.new_status.value] = counts.get(result.new_status.value, 0) + 1
            failed = result.new_status is not DeliveryStatus.DELIVERED
            level = logging.WARNING if failed else logging.DEBUG
            if log.isEnabledFor(level):
                log.log(level, "delivery attempt" if result.counted else "delivery not sent",
                        extra={
                    "delivery_id": result.work.delivery_id, "event_id": result.work.event_id,
                    "attempt": result.attempt, "listener_id": result.work.listener_id,
                    "channel": result.work.channel.value, "status_code": result.status_code,
                    "outcome": result.new_status.value, "ms": result.latency_ms,
                    "error": result.error})
        for closing in chunk.closings:
            if closing.delivery_status is not None or closing.job_status == "dead":
                log.info("delivery closed without an attempt", extra={
                    "delivery_id": closing.work.delivery_id,
                    "outbox_job_id": closing.work.job_id,
                    "status": (closing.delivery_status.value if closing.delivery_status
                               else None), "reason": closing.error})
    if claimed and log.isEnabledFor(logging.INFO):
        log.info("delivery batch", extra={
            "outbox_job_id": job.id, "claimed": claimed, "chunks": len(chunks),
            **{status.lower(): n for status, n in counts.items()},
            "ms": round((time.monotonic() - began) * 1000, 3)})
