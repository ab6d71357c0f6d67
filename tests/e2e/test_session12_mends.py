"""Session 12's mends of points earlier sessions noticed and left alone.

- A delivery cancelled while its attempt is in flight (CancelCampaign withdrawing a clearance
  announcement) kept the attempt's HTTP error as ``last_error``, hiding why it was cancelled.
- RedeliverEvent could re-send a cancelled campaign's clearance announcement: the listener was
  asked to clear a campaign that will never run. The event is now withdrawn (EVENT_WITHDRAWN).

The bonus batch's deferral (the next window's job while an earlier one runs) is tested in
tests/e2e/test_bonus_races_audit.py; the worker stopping on a frozen Redis in
tests/integration/test_outage_audit.py.
"""

from __future__ import annotations

import asyncio

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.campaigns import clearance_dedup_key
from core.clock import FixedClock
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from server.errors import error_info_of
from storage import webhooks as repo
from tests.conftest import Api
from tests.e2e.test_state_machine_audit import _cancel, campaign_in
from tests.e2e.test_webhook_behaviour_audit import (
    RawListener,
    add_listener,
    attempts_of,
    delivery_of,
    emit,
    worker_ctx,
)
from workers.outbox import run_outbox_job


async def test_a_delivery_cancelled_mid_attempt_keeps_why_it_was_cancelled(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """The clearance announcement's attempt is in flight (the listener holds its answer) when
    the campaign is cancelled; the listener then answers 503. The delivery is CANCELLED with
    last_error "campaign cancelled" (the 503 is its last status code and in its attempt log),
    and no retry is made."""
    release = asyncio.Event()

    async def slow_503(raw: RawListener, _: asyncio.StreamReader,
                       writer: asyncio.StreamWriter) -> None:
        await release.wait()
        await raw.write(writer, b"HTTP/1.1 503 Busy\r\nContent-Length: 0\r\n\r\n")

    raw = await RawListener(slow_503).start()
    dedup_key = clearance_dedup_key(41)
    try:
        listener_id = await add_listener(pool, raw.url, clock.now())
        emitted = await emit(pool, clock, dedup_key=dedup_key)
        async with worker_ctx(settings, pool, clock) as ctx:
            task = asyncio.create_task(run_outbox_job(ctx, emitted.outbox_job_ids[0]))
            for _ in range(500):
                if raw.requests:
                    break
                await asyncio.sleep(0.01)
            assert raw.requests, "the attempt never reached the listener"
            async with pool.acquire() as conn:
                assert await repo.cancel_pending_deliveries(
                    conn, dedup_key, now=clock.now(), why="campaign cancelled") == 1
            release.set()
            await asyncio.wait_for(task, 10)
    finally:
        await raw.stop()
    row = await delivery_of(pool, listener_id)
    assert (row.status.value, row.last_error, row.last_status_code) == (
        "CANCELLED", "campaign cancelled", 503)
    assert row.next_attempt_at is None
    [attempt] = await attempts_of(pool, row.id)
    assert attempt.status_code == 503
    assert len(raw.requests) == 1


async def test_a_cancelled_campaigns_announcement_cannot_be_redelivered(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """CancelCampaign withdraws the clearance announcement: RedeliverEvent on its (cancelled)
    delivery is FAILED_PRECONDITION EVENT_WITHDRAWN, with the reason in the message and the
    delivery's status in ErrorInfo, and nothing is queued. A retry with the same request_id
    gives the same refusal."""
    await campaign_in("AWAITING_CLEARANCE", api, pool, settings, clock)
    await _cancel(api, "cancel-it")
    delivery_id = await pool.fetchval(
        """SELECT d.id FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id
            WHERE e.event_type = $1""", lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN)
    jobs_before = await pool.fetchval("SELECT count(*) FROM outbox_jobs")
    stub = lpb_grpc.ListenerServiceStub(api.channel)
    for _ in range(2):
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.RedeliverEvent(lpb.RedeliverEventRequest(
                request_id="redeliver-stale", delivery_id=delivery_id), metadata=api.key())
        assert caught.value.code() is grpc.StatusCode.FAILED_PRECONDITION
        info = error_info_of(caught.value)
        assert info is not None and info.reason == "EVENT_WITHDRAWN"
        assert dict(info.metadata) == {"delivery_id": str(delivery_id), "status": "CANCELLED"}
        assert "withdrawn (campaign cancelled)" in (caught.value.details() or "")
    assert await pool.fetchval("SELECT count(*) FROM outbox_jobs") == jobs_before
    assert await pool.fetchval(
        "SELECT status FROM webhook_deliveries WHERE id = $1", delivery_id) == "CANCELLED"


async def test_other_events_are_not_withdrawn_and_redeliver_as_before(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Cancelling one campaign withdraws only its own announcement: an executed campaign's
    announcement (a delivery that ended CANCELLED for another reason would do too) redelivers."""
    await campaign_in("EXECUTED", api, pool, settings, clock)
    assert await pool.fetchval(
        "SELECT count(*) FROM webhook_events WHERE withdrawn IS NOT NULL") == 0
    delivery_id = await pool.fetchval(
        """SELECT d.id FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id
            WHERE e.event_type = $1""", lpb.EVENT_TYPE_SCHEDULED_CAMPAIGN)
    await pool.execute("UPDATE webhook_deliveries SET status = 'FAILED' WHERE id = $1",
                       delivery_id)
    reply = await lpb_grpc.ListenerServiceStub(api.channel).RedeliverEvent(
        lpb.RedeliverEventRequest(request_id="redeliver-ok", delivery_id=delivery_id),
        metadata=api.key())
    assert reply.delivery.status == lpb.DELIVERY_STATUS_PENDING
