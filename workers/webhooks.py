"""Webhook delivery: the outbox handler for kind ``webhook.deliver``.

One attempt: read the delivery, its event and its listener's current URL and secret, log the
attempt as started, release the connection (never hold one while calling a peer), POST the
signed body, then record the result. Retryable failures (timeouts, connection errors, 5xx, 408,
425, 429) raise an ordinary exception so the outbox retries with backoff; a refusal (other 4xx,
3xx) and the end of the retry budget (PROMO_WEBHOOK_MAX_ATTEMPTS or the deadline) raise
PermanentJobError. Delivery is at least once: a worker that dies after the listener got the
request but before the result was stored leaves the outbox row leased, the sweeper queues it
again after the lease, and the listener sees the same Promo-Event-Id twice.

``setup``/``teardown`` create and close the worker's one httpx client (connection reuse); the
worker's on_startup/on_shutdown call them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import datetime, timedelta
from typing import Any

import httpx

from config.settings import Settings
from core.clock import Clock
from core.events import DeliveryStatus, Outcome, classify_status
from core.webhook_signature import (
    HEADER_EVENT_ID,
    HEADER_EVENT_TYPE,
    HEADER_SIGNATURE,
    HEADER_TIMESTAMP,
    signature_header,
)
from storage import webhooks as repo
from storage.outbox import OutboxJob
from workers.registry import PermanentJobError, handler

log = logging.getLogger("promo.webhooks")

HTTP_CLIENT_KEY = "webhook_http"
USER_AGENT = "promo-engine-webhooks/1"
HEADER_DELIVERY_ID = "Promo-Delivery-Id"
HEADER_DELIVERY_ATTEMPT = "Promo-Delivery-Attempt"
# How much of a failed answer's body is kept in the delivery log.
RESPONSE_SNIPPET_BYTES = 512


def http_timeout(settings: Settings) -> float:
    """The webhook timeout, but at most half the outbox lease: an attempt still waiting for its
    answer must not be queued again by the sweeper (two concurrent attempts of one delivery)."""
    return min(settings.webhook_timeout_seconds, settings.job_lease_seconds / 2)


class DeliveryRetry(Exception):
    """A transient failure; the outbox records it and retries with backoff."""


async def setup(ctx: dict[str, Any]) -> httpx.AsyncClient:
    """Create the worker's HTTP client (inside the worker's loop) and keep it in ctx."""
    settings: Settings = ctx["settings"]
    client = httpx.AsyncClient(
        timeout=httpx.Timeout(http_timeout(settings)),
        # A signed POST is never forwarded: a redirect is reported, not followed.
        follow_redirects=False,
        headers={"User-Agent": USER_AGENT},
        limits=httpx.Limits(max_connections=settings.worker_max_jobs,
                            max_keepalive_connections=settings.worker_max_jobs))
    ctx[HTTP_CLIENT_KEY] = client
    return client


async def teardown(ctx: dict[str, Any]) -> None:
    client: httpx.AsyncClient | None = ctx.pop(HTTP_CLIENT_KEY, None)
    if client is not None:
        await client.aclose()


def _secrets(work: repo.DeliveryWork, *, now: datetime, grace: timedelta) -> list[str]:
    """The current secret, plus the previous one during the grace period after a rotation."""
    assert work.secret is not None
    keys = [work.secret]
    if (work.previous_secret and work.secret_rotated_at is not None
            and now - work.secret_rotated_at < grace and work.previous_secret != work.secret):
        keys.append(work.previous_secret)
    return keys


def _deadline(work: repo.DeliveryWork, settings: Settings) -> datetime:
    if work.deliver_by is not None:
        return work.deliver_by
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


@handler(repo.DELIVER_KIND)
async def deliver(ctx: dict[str, Any], job: OutboxJob) -> None:
    """One attempt at one delivery (an outbox job with payload {"delivery_id": ...})."""
    settings: Settings = ctx["settings"]
    clock: Clock = ctx["clock"]
    pool = ctx["pool"]
    try:
        delivery_id = int(job.payload["delivery_id"])
    except (KeyError, TypeError, ValueError):
        raise PermanentJobError(
            f"webhook job payload has no delivery_id: {job.payload!r}") from None
    now = clock.now()
    give_up: str | None = None
    attempt = 0
    async with pool.acquire() as conn, conn.transaction():
        work = await repo.load_work(conn, delivery_id, lock=True)
        if work is None:
            give_up = f"webhook delivery {delivery_id} does not exist"
        elif work.status is not DeliveryStatus.PENDING or work.outbox_job_id != job.id:
            # Finished, cancelled, or superseded by a redelivery's job: nothing to do.
            log.info("webhook delivery not pending; skipped", extra={
                "delivery_id": delivery_id, "status": work.status.value,
                "outbox_job_id": job.id})
            return
        elif work.listener_url is None or not work.listener_active:
            why = "listener unregistered" if work.listener_url is None else "listener inactive"
            await repo.close_delivery(conn, delivery_id, status=DeliveryStatus.CANCELLED,
                                      error=why, now=now)
            log.info("webhook delivery cancelled", extra={"delivery_id": delivery_id,
                                                          "reason": why})
            return
        elif now >= (deadline := _deadline(work, settings)):
            give_up = f"deadline {deadline.isoformat()} passed before the attempt"
            await repo.close_delivery(conn, delivery_id, status=DeliveryStatus.DEAD,
                                      error=give_up, now=now)
        else:
            attempt = await repo.start_attempt(conn, delivery_id, outbox_job_id=job.id,
                                               url=work.listener_url, now=now)
    if give_up is not None:
        raise PermanentJobError(give_up)
    assert work is not None and work.listener_url is not None

    # The connection is back in the pool: now talk to the listener.
    client: httpx.AsyncClient = ctx.get(HTTP_CLIENT_KEY) or await setup(ctx)
    sent_at = clock.now()
    timestamp = int(sent_at.timestamp())
    headers = {
        "Content-Type": "application/json",
        HEADER_EVENT_ID: work.event_id,
        HEADER_EVENT_TYPE: str(work.event_type),
        HEADER_TIMESTAMP: str(timestamp),
        HEADER_SIGNATURE: signature_header(
            _secrets(work, now=sent_at,
                     grace=timedelta(seconds=settings.webhook_secret_grace_seconds)),
            timestamp, work.body),
        HEADER_DELIVERY_ID: str(delivery_id),
        HEADER_DELIVERY_ATTEMPT: str(attempt),
    }
    started = time.perf_counter()
    status_code, error, outcome = await _post(client, work.listener_url, work.body, headers,
                                              http_timeout(settings))
    latency_ms = round((time.perf_counter() - started) * 1000, 3)

    finished = clock.now()
    raise_error: Exception | None = None
    if outcome is Outcome.DELIVERED:
        new_status = DeliveryStatus.DELIVERED
    elif outcome is Outcome.REJECTED:
        new_status = DeliveryStatus.FAILED
        raise_error = PermanentJobError(f"listener refused the delivery: {error}")
    else:
        limit = min(job.max_attempts, settings.webhook_max_attempts)
        if job.attempts >= limit:
            new_status = DeliveryStatus.DEAD
            error = f"{error} (gave up after {job.attempts} attempts)"
            raise_error = PermanentJobError(error)
        elif finished >= _deadline(work, settings):
            new_status = DeliveryStatus.DEAD
            error = f"{error} (deadline {_deadline(work, settings).isoformat()} passed)"
            raise_error = PermanentJobError(error)
        else:
            new_status = DeliveryStatus.PENDING
            raise_error = DeliveryRetry(error)
    async with pool.acquire() as conn, conn.transaction():
        await repo.finish_attempt(conn, delivery_id, attempt, now=finished,
                                  status_code=status_code, error=error, latency_ms=latency_ms,
                                  new_status=new_status)
    log.log(logging.INFO if new_status is DeliveryStatus.DELIVERED else logging.WARNING,
            "webhook attempt", extra={
                "delivery_id": delivery_id, "event_id": work.event_id, "attempt": attempt,
                "listener_id": work.listener_id, "status_code": status_code,
                "outcome": new_status.value, "ms": latency_ms, "error": error})
    if raise_error is not None:
        raise raise_error
