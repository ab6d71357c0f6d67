"""Webhook delivery end to end below the API: emit in a transaction, a real arq worker on real
Redis, real HTTP to a real listener on loopback that verifies every signature. Covers retries
(5xx, timeouts, a listener that is down), permanent refusals, the deadline, a worker dying
mid-delivery, idempotent emits, inactive listeners, secret rotation and redelivery."""

from __future__ import annotations

import asyncio
import contextlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import trustme
from arq import create_pool as create_arq_pool
from arq.connections import ArqRedis, RedisSettings

from config.settings import Settings
from core.clock import Clock, SystemClock
from core.events import EventType, Outcome
from core.webhook_signature import (
    HEADER_EVENT_TYPE,
    HEADER_SIGNATURE,
    SignatureError,
    verify,
)
from storage import webhooks as repo
from storage.queue import queue_after_commit
from tests.webhook_listener import SECRET, WebhookListener, free_port
from workers import webhooks
from workers.main import build_worker
from workers.outbox import run_outbox_job, sweep_once


@pytest.fixture
async def listener() -> AsyncIterator[WebhookListener]:
    server = await WebhookListener().start()
    try:
        yield server
    finally:
        await server.stop()


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """Retries in tens of milliseconds, a short HTTP timeout."""
    return settings.model_copy(update={"webhook_timeout_seconds": 0.5})


async def add_listener(pool: asyncpg.Pool, url: str, *, secret: str = SECRET,
                       event_type: EventType = EventType.SCHEDULED_CAMPAIGN,
                       active: bool = True) -> int:
    async with pool.acquire() as conn:
        row = await repo.insert_listener(conn, event_type=int(event_type), url=url,
                                         secret=secret, active=active, description="test",
                                         now=datetime.now(UTC))
    return row.id


async def emit(pool: asyncpg.Pool, redis: ArqRedis | None, settings: Settings, *,
               event_type: EventType = EventType.SCHEDULED_CAMPAIGN,
               payload: dict[str, Any] | None = None, now: datetime | None = None,
               **kw: Any) -> repo.EmittedEvent | None:
    """Emit in a transaction, then queue after commit, as an emitter does."""
    when = now or datetime.now(UTC)
    async with pool.acquire() as conn, conn.transaction():
        emitted = await repo.emit_event(conn, event_type=event_type, now=when,
                                        payload=payload or {"campaign_id": "spring"}, **kw)
    if emitted is not None:
        for job_id in emitted.outbox_job_ids:
            await queue_after_commit(redis, job_id=job_id, due_at=when,
                                     queue_name=settings.queue_name)
    return emitted


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, *, clock: Clock | None = None,
                         sweeper: bool = False) -> AsyncIterator[None]:
    """A real arq worker (not burst) in this loop, stopped on exit."""
    worker = build_worker(settings, clock=clock, handle_signals=False, run_sweeper=sweeper)
    task = asyncio.create_task(worker.async_run())
    try:
        yield
    finally:
        with contextlib.suppress(asyncio.CancelledError):
            await worker.close()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def wait_until(check: Callable[[], Awaitable[bool]], *, within: float = 10.0,
                     what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if await check():
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def deliveries(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    async with pool.acquire() as conn:
        return list(await conn.fetch("SELECT * FROM webhook_deliveries ORDER BY id"))


async def settled(pool: asyncpg.Pool, statuses: Iterable[str] = ("DELIVERED", "FAILED",
                                                                  "DEAD", "CANCELLED")) -> bool:
    """Every delivery finished, and every delivery job too (a job's outbox row is settled just
    after its delivery: a worker stopped in between leaves it to the sweeper)."""
    rows = await deliveries(pool)
    if not rows or not all(r["status"] in set(statuses) for r in rows):
        return False
    async with pool.acquire() as conn:
        pending: int = await conn.fetchval(
            "SELECT count(*) FROM outbox_jobs WHERE kind = 'webhook.deliver'"
            " AND status = 'pending'")
    return pending == 0


async def attempts(pool: asyncpg.Pool, delivery_id: int) -> list[repo.AttemptRow]:
    async with pool.acquire() as conn:
        return await repo.list_attempts(conn, delivery_id)


async def outbox_row(pool: asyncpg.Pool, job_id: int) -> asyncpg.Record:
    async with pool.acquire() as conn:
        row = await conn.fetchrow("SELECT * FROM outbox_jobs WHERE id = $1", job_id)
    assert row is not None
    return row


async def test_signed_delivery_reaches_the_listener(fast: Settings, pool: asyncpg.Pool,
                                                    arq_redis: ArqRedis,
                                                    listener: WebhookListener) -> None:
    await add_listener(pool, listener.url)
    emitted = await emit(pool, arq_redis, fast, payload={"campaign_id": "spring", "n": 3})
    assert emitted is not None and len(emitted.outbox_job_ids) == 1
    async with running_worker(fast):
        await wait_until(lambda: settled(pool), what="delivery")
    [got] = listener.received
    assert got.verify_error is None
    assert got.event_id == emitted.event_id
    assert got.headers[HEADER_EVENT_TYPE.lower()] == "5"
    assert got.headers["content-type"] == "application/json"
    assert got.headers[HEADER_SIGNATURE.lower()].startswith("v1=")
    body = json.loads(got.body)
    assert body["event_id"] == emitted.event_id and body["event_type"] == 5
    assert body["data"] == {"campaign_id": "spring", "n": 3}
    assert datetime.fromisoformat(body["occurred_at"]).tzinfo is not None
    [row] = await deliveries(pool)
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("DELIVERED", 1, 200)
    assert row["delivered_at"] is not None and row["last_latency_ms"] > 0
    [attempt] = await attempts(pool, row["id"])
    assert (attempt.attempt, attempt.status_code, attempt.error) == (1, 200, None)
    assert attempt.url == listener.url and attempt.finished_at is not None
    assert (await outbox_row(pool, emitted.outbox_job_ids[0]))["status"] == "done"


async def test_5xx_twice_then_200_is_delivered_on_the_third_attempt(
        fast: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis,
        listener: WebhookListener) -> None:
    listener.answer(500, 503, 200)
    await add_listener(pool, listener.url)
    emitted = await emit(pool, arq_redis, fast)
    assert emitted is not None
    async with running_worker(fast):
        await wait_until(lambda: settled(pool), what="delivery")
    [row] = await deliveries(pool)
    assert (row["status"], row["attempts"], row["last_error"]) == ("DELIVERED", 3, None)
    logged = await attempts(pool, row["id"])
    assert [a.status_code for a in logged] == [500, 503, 200]
    assert logged[0].error == "HTTP 500: listener says 500"
    assert all(a.latency_ms is not None for a in logged)
    assert len(listener.received) == 3 and len(listener.processed) == 1
    assert {r.event_id for r in listener.received} == {emitted.event_id}
    job = await outbox_row(pool, emitted.outbox_job_ids[0])
    assert (job["status"], job["attempts"]) == ("done", 3)


async def test_timeouts_and_429_are_retried(fast: Settings, pool: asyncpg.Pool,
                                            arq_redis: ArqRedis,
                                            listener: WebhookListener) -> None:
    listener.answer((1.5, 200), 429, 204)  # the first answer comes after the 0.5 s timeout
    await add_listener(pool, listener.url)
    await emit(pool, arq_redis, fast)
    async with running_worker(fast):
        await wait_until(lambda: settled(pool), what="delivery")
    [row] = await deliveries(pool)
    assert row["status"] == "DELIVERED"
    logged = await attempts(pool, row["id"])
    assert [a.status_code for a in logged] == [None, 429, 204]
    assert logged[0].error is not None and logged[0].error.startswith("timeout after 0.5 s")


async def test_a_listener_that_is_down_gets_the_event_when_it_is_back(
        fast: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis) -> None:
    port = free_port()  # nothing listens there yet: connections are refused
    down = WebhookListener(port=port)
    await add_listener(pool, down.url)
    emitted = await emit(pool, arq_redis, fast)
    assert emitted is not None

    async def failed_twice() -> bool:
        # Two attempts logged as refused (the row's counter also counts one in flight).
        rows = await deliveries(pool)
        return bool(rows) and len([a for a in await attempts(pool, rows[0]["id"])
                                   if a.status_code is None and a.error]) >= 2

    try:
        async with running_worker(fast):
            await wait_until(failed_twice, what="two refused attempts")
            [row] = await deliveries(pool)
            assert row["status"] == "PENDING" and row["last_status_code"] is None
            assert "ConnectError" in row["last_error"]
            await down.start(port)  # back up
            await wait_until(lambda: settled(pool), what="delivery once back")
    finally:
        await down.stop()
    [row] = await deliveries(pool)
    assert row["status"] == "DELIVERED" and row["attempts"] >= 3
    assert [r.event_id for r in down.received] == [emitted.event_id]


async def test_a_400_fails_permanently_without_retry(fast: Settings, pool: asyncpg.Pool,
                                                     arq_redis: ArqRedis,
                                                     listener: WebhookListener) -> None:
    listener.answer(400)
    await add_listener(pool, listener.url)
    emitted = await emit(pool, arq_redis, fast)
    assert emitted is not None
    async with running_worker(fast):
        await wait_until(lambda: settled(pool), what="permanent failure")
        await asyncio.sleep(0.3)  # room for a (wrong) retry to show up
    [row] = await deliveries(pool)
    assert (row["status"], row["attempts"], row["last_status_code"]) == ("FAILED", 1, 400)
    assert row["last_error"] == "HTTP 400: listener says 400"
    assert len(listener.received) == 1
    job = await outbox_row(pool, emitted.outbox_job_ids[0])
    assert (job["status"], job["attempts"]) == ("dead", 1)
    assert "listener refused the delivery" in job["last_error"]


async def test_attempts_run_out_then_redelivery_of_the_dead_delivery(
        fast: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis,
        listener: WebhookListener) -> None:
    limited = fast.model_copy(update={"webhook_max_attempts": 2})
    listener.default = 502
    await add_listener(pool, listener.url)
    emitted = await emit(pool, arq_redis, limited)
    assert emitted is not None
    async with running_worker(limited):
        await wait_until(lambda: settled(pool), what="dead delivery")
        [row] = await deliveries(pool)
        assert (row["status"], row["attempts"]) == ("DEAD", 2)
        assert "gave up after 2 attempts" in row["last_error"]

        async def outbox_dead() -> bool:  # the worker records it just after the delivery row
            return bool((await outbox_row(pool, emitted.outbox_job_ids[0]))["status"] == "dead")

        await wait_until(outbox_dead, what="dead outbox job")

        listener.default = 200  # the listener is fixed; an operator redelivers
        async with pool.acquire() as conn, conn.transaction():
            again, job_id = await repo.redeliver(conn, row["id"], now=datetime.now(UTC))
        assert again.status.value == "PENDING" and again.next_attempt_at is not None
        await queue_after_commit(arq_redis, job_id=job_id, due_at=datetime.now(UTC),
                                 queue_name=limited.queue_name)
        await wait_until(lambda: settled(pool), what="redelivery")
    [row] = await deliveries(pool)
    assert (row["status"], row["attempts"], row["outbox_job_id"]) == ("DELIVERED", 3, job_id)
    assert [a.status_code for a in await attempts(pool, row["id"])] == [502, 502, 200]
    assert {r.event_id for r in listener.received} == {emitted.event_id}
    assert listener.received[0].body == listener.received[-1].body  # the same bytes


async def test_the_deadline_stops_retries(fast: Settings, pool: asyncpg.Pool,
                                          arq_redis: ArqRedis,
                                          listener: WebhookListener) -> None:
    listener.default = 503
    await add_listener(pool, listener.url)
    now = datetime.now(UTC)
    await emit(pool, arq_redis, fast, now=now, deliver_by=now + timedelta(seconds=0.4))
    async with running_worker(fast):
        await wait_until(lambda: settled(pool), what="deadline")
    [row] = await deliveries(pool)
    assert row["status"] == "DEAD" and "deadline" in row["last_error"]
    assert row["deliver_by"] == now + timedelta(seconds=0.4)
    assert 1 <= len(listener.received) < 10


async def test_a_worker_killed_mid_delivery_causes_a_retry_not_a_loss(
        fast: Settings, pool: asyncpg.Pool, listener: WebhookListener) -> None:
    listener.answer("hang")  # the listener gets the request; the worker dies before the answer
    await add_listener(pool, listener.url)
    emitted = await emit(pool, None, fast)  # Redis never hears of it: only the sweeper can
    assert emitted is not None
    [job_id] = emitted.outbox_job_ids

    ctx: dict[str, Any] = {"pool": pool, "clock": SystemClock(), "settings": fast,
                           "redis": None}
    await webhooks.setup(ctx)
    doomed = asyncio.create_task(run_outbox_job(ctx, job_id))
    await asyncio.wait_for(listener.hung.wait(), 5)
    doomed.cancel()  # the worker process is gone: nothing after this line of its runs
    with contextlib.suppress(asyncio.CancelledError):
        await doomed
    await webhooks.teardown(ctx)

    job = await outbox_row(pool, job_id)
    assert (job["status"], job["attempts"]) == ("pending", 1)
    assert job["locked_until"] > datetime.now(UTC)  # leased: not re-queued yet
    [row] = await deliveries(pool)
    assert (row["status"], row["attempts"]) == ("PENDING", 1)
    [unfinished] = await attempts(pool, row["id"])
    assert unfinished.finished_at is None

    assert fast.redis_url
    redis = await create_arq_pool(RedisSettings.from_dsn(fast.redis_url))
    try:
        sweep_ctx = {"pool": pool, "redis": redis, "clock": SystemClock(), "settings": fast}
        assert await sweep_once(sweep_ctx) == 0  # still leased
        async with pool.acquire() as conn:  # time passes: the lease runs out
            # (an attempt in flight holds its job's lease and due time until the lease's end)
            await conn.execute(
                "UPDATE outbox_jobs SET locked_until = locked_until - $1::interval,"
                " due_at = due_at - $1::interval", timedelta(seconds=fast.job_lease_seconds + 1))
        assert await sweep_once(sweep_ctx) == 1
    finally:
        await redis.aclose()
    async with running_worker(fast):
        await wait_until(lambda: settled(pool), what="delivery after the crash")

    [row] = await deliveries(pool)
    assert (row["status"], row["attempts"]) == ("DELIVERED", 2)
    first, second = await attempts(pool, row["id"])
    assert first.error is not None and first.error.startswith("interrupted")
    assert second.status_code == 200
    # At least once: the listener saw the event twice and processed it once.
    assert [r.event_id for r in listener.received] == [emitted.event_id] * 2
    assert [r.duplicate for r in listener.received] == [False, True]
    assert list(listener.processed) == [emitted.event_id]


async def test_emit_without_listeners_creates_no_deliveries(fast: Settings,
                                                            pool: asyncpg.Pool) -> None:
    await add_listener(pool, "http://127.0.0.1:9/other", event_type=EventType.BONUS_ISSUED)
    emitted = await emit(pool, None, fast)
    assert emitted is not None and emitted.outbox_job_ids == []
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM webhook_events") == 1
        assert await conn.fetchval("SELECT count(*) FROM webhook_deliveries") == 0
        assert await conn.fetchval("SELECT count(*) FROM outbox_jobs") == 0


async def test_dedup_key_makes_emit_idempotent(fast: Settings, pool: asyncpg.Pool) -> None:
    await add_listener(pool, "http://127.0.0.1:9/a")
    await add_listener(pool, "http://127.0.0.1:9/b")
    first = await emit(pool, None, fast, dedup_key="campaign:1:clearance")
    second = await emit(pool, None, fast, dedup_key="campaign:1:clearance",
                        payload={"campaign_id": "other"})
    assert first is not None and len(first.outbox_job_ids) == 2
    assert second is None
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM webhook_events") == 1
        assert await conn.fetchval("SELECT count(*) FROM webhook_deliveries") == 2
        jobs = await conn.fetch("SELECT kind, payload, max_attempts FROM outbox_jobs")
    delivery_ids = {r["id"] for r in await deliveries(pool)}
    assert {j["payload"]["delivery_id"] for j in jobs} == delivery_ids
    assert {j["kind"] for j in jobs} == {"webhook.deliver"}


async def test_emit_rolls_back_with_the_callers_transaction(fast: Settings,
                                                            pool: asyncpg.Pool) -> None:
    await add_listener(pool, "http://127.0.0.1:9/a")
    with pytest.raises(RuntimeError):
        async with pool.acquire() as conn, conn.transaction():
            await repo.emit_event(conn, event_type=EventType.SCHEDULED_CAMPAIGN,
                                  payload={}, now=datetime.now(UTC))
            raise RuntimeError("the change failed")
    async with pool.acquire() as conn:
        for table in ("webhook_events", "webhook_deliveries", "outbox_jobs"):
            assert await conn.fetchval(f"SELECT count(*) FROM {table}") == 0
    async with pool.acquire() as conn:
        with pytest.raises(ValueError, match="unknown event type 7"):
            await repo.emit_event(conn, event_type=7, payload={}, now=datetime.now(UTC))


async def test_inactive_listeners_get_nothing(fast: Settings, pool: asyncpg.Pool,
                                              arq_redis: ArqRedis,
                                              listener: WebhookListener) -> None:
    await add_listener(pool, listener.url + "?inactive", active=False)
    later_off = await add_listener(pool, listener.url + "?deactivated-after-emit")
    emitted = await emit(pool, arq_redis, fast)
    assert emitted is not None and len(emitted.outbox_job_ids) == 1  # not for the inactive one
    async with pool.acquire() as conn:
        await repo.update_listener(conn, later_off, now=datetime.now(UTC), active=False)
    async with running_worker(fast):
        await wait_until(lambda: settled(pool), what="cancellation")
    [row] = await deliveries(pool)
    assert (row["status"], row["attempts"], row["last_error"]) == (
        "CANCELLED", 0, "listener inactive")
    assert listener.received == []


async def test_secret_rotation_signs_with_both_secrets_during_the_grace_period(
        fast: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis,
        listener: WebhookListener) -> None:
    listener_id = await add_listener(pool, listener.url)
    new_secret = "rotated-secret-0123456789abcdef"
    async with pool.acquire() as conn:
        await repo.update_listener(conn, listener_id, now=datetime.now(UTC), secret=new_secret)
    listener.secrets = [new_secret]  # this listener already switched; the old config works too
    await emit(pool, arq_redis, fast)
    async with running_worker(fast):
        await wait_until(lambda: settled(pool), what="delivery")
    [got] = listener.received
    assert got.verify_error is None
    assert got.headers[HEADER_SIGNATURE.lower()].count("v1=") == 2
    verify(SECRET, got.headers, got.body, now=int(time.time()))  # the old secret still verifies

    no_grace = fast.model_copy(update={"webhook_secret_grace_seconds": 0})
    await emit(pool, arq_redis, no_grace)
    async with running_worker(no_grace):
        await wait_until(lambda: settled(pool), what="delivery")
    latest = listener.received[-1]
    assert latest.headers[HEADER_SIGNATURE.lower()].count("v1=") == 1
    with pytest.raises(SignatureError):
        verify(SECRET, latest.headers, latest.body, now=int(time.time()))


# Batches: one worker job claims the other due deliveries too (PROMO_WEBHOOK_BATCH_SIZE).

async def test_a_batch_with_mixed_answers_records_each_delivery_on_its_own(
        fast: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis) -> None:
    small = fast.model_copy(update={"webhook_batch_size": 7})  # 30 deliveries: several chunks
    ok, flaky, refuser = (await WebhookListener().start(),
                          await WebhookListener(first_answer=503).start(),  # then 200
                          await WebhookListener(default=400).start())
    try:
        ids = {name: await add_listener(pool, server.url) for name, server in
               (("ok", ok), ("flaky", flaky), ("refuser", refuser))}
        events = [await emit(pool, arq_redis, small, payload={"campaign_id": f"c{i}"})
                  for i in range(10)]
        async with running_worker(small):
            await wait_until(lambda: settled(pool), what="30 deliveries", within=20)
    finally:
        for server in (ok, flaky, refuser):
            await server.stop()
    rows = await deliveries(pool)
    by_listener = {name: [r for r in rows if r["listener_id"] == listener_id]
                   for name, listener_id in ids.items()}
    assert {(r["status"], r["attempts"]) for r in by_listener["ok"]} == {("DELIVERED", 1)}
    assert {(r["status"], r["attempts"]) for r in by_listener["flaky"]} == {("DELIVERED", 2)}
    assert {(r["status"], r["attempts"], r["last_status_code"])
            for r in by_listener["refuser"]} == {("FAILED", 1, 400)}
    event_ids = {e.event_id for e in events if e is not None}
    assert sorted(r.event_id for r in ok.received) == sorted(event_ids)  # each exactly once
    assert len(flaky.received) == 20 and set(flaky.processed) == event_ids
    assert len(refuser.received) == 10
    async with pool.acquire() as conn:
        jobs = await conn.fetch("SELECT status, attempts, locked_until, last_error "
                                "FROM outbox_jobs ORDER BY id")
        unfinished = await conn.fetchval(
            "SELECT count(*) FROM webhook_attempts WHERE finished_at IS NULL")
    assert sorted(j["status"] for j in jobs) == ["dead"] * 10 + ["done"] * 20
    assert all(j["locked_until"] is None for j in jobs) and unfinished == 0
    assert all("listener refused the delivery: HTTP 400" in j["last_error"]
               for j in jobs if j["status"] == "dead")
    for row in by_listener["flaky"]:
        assert [a.status_code for a in await attempts(pool, row["id"])] == [503, 200]


async def test_two_copies_of_one_job_make_one_attempt(fast: Settings, pool: asyncpg.Pool,
                                                      listener: WebhookListener) -> None:
    """arq delivers at least once: two copies of a delivery's job running at once send it
    once; the second finds it in flight and leaves its outbox row alone."""
    listener.answer((0.3, 200))
    await add_listener(pool, listener.url)
    emitted = await emit(pool, None, fast)
    assert emitted is not None
    [job_id] = emitted.outbox_job_ids
    ctx: dict[str, Any] = {"pool": pool, "clock": SystemClock(), "settings": fast,
                           "redis": None}
    await webhooks.setup(ctx)
    try:
        outcomes = await asyncio.gather(run_outbox_job(ctx, job_id), run_outbox_job(ctx, job_id))
    finally:
        await webhooks.teardown(ctx)
    # The second copy either lost the race to start the row ("not due": its due time already
    # moved to the end of the lease) or started it too and then found it in flight.
    assert outcomes.count("done") == 1
    assert {*outcomes} - {"done"} <= {"already running", "not due or already done"}
    assert len(listener.received) == 1
    [row] = await deliveries(pool)
    assert (row["status"], row["attempts"]) == ("DELIVERED", 1)
    assert (await outbox_row(pool, job_id))["status"] == "done"


async def test_a_worker_killed_mid_batch_loses_none_of_its_deliveries(
        fast: Settings, pool: asyncpg.Pool, listener: WebhookListener) -> None:
    listener.answer(*["hang"] * 5)
    await add_listener(pool, listener.url)
    emitted = [await emit(pool, None, fast, payload={"campaign_id": f"c{i}"}) for i in range(5)]
    job_ids = [job for e in emitted if e is not None for job in e.outbox_job_ids]
    ctx: dict[str, Any] = {"pool": pool, "clock": SystemClock(), "settings": fast,
                           "redis": None}
    await webhooks.setup(ctx)
    doomed = asyncio.create_task(run_outbox_job(ctx, job_ids[0]))  # claims all five

    async def all_hung() -> bool:
        return len(listener.received) == 5

    await wait_until(all_hung, what="five requests in flight")
    doomed.cancel()  # the worker process is gone
    with contextlib.suppress(asyncio.CancelledError):
        await doomed
    await webhooks.teardown(ctx)
    async with pool.acquire() as conn:
        jobs = await conn.fetch("SELECT status, attempts, due_at, locked_until FROM outbox_jobs")
    now = datetime.now(UTC)
    assert [(j["status"], j["attempts"]) for j in jobs] == [("pending", 1)] * 5
    assert all(j["due_at"] > now and j["locked_until"] > now for j in jobs)  # in flight
    assert [(r["status"], r["attempts"]) for r in await deliveries(pool)] == [("PENDING", 1)] * 5

    assert fast.redis_url
    redis = await create_arq_pool(RedisSettings.from_dsn(fast.redis_url))
    try:
        sweep_ctx = {"pool": pool, "redis": redis, "clock": SystemClock(), "settings": fast}
        assert await sweep_once(sweep_ctx) == 0  # still leased
        async with pool.acquire() as conn:  # time passes: the lease runs out
            await conn.execute(
                "UPDATE outbox_jobs SET locked_until = locked_until - $1::interval,"
                " due_at = due_at - $1::interval", timedelta(seconds=fast.job_lease_seconds + 1))
        assert await sweep_once(sweep_ctx) == 5
    finally:
        await redis.aclose()
    listener.release.set()
    async with running_worker(fast):
        await wait_until(lambda: settled(pool), what="delivery after the crash")
    for row in await deliveries(pool):
        assert (row["status"], row["attempts"]) == ("DELIVERED", 2)
        first, second = await attempts(pool, row["id"])
        assert first.error is not None and first.error.startswith("interrupted")
        assert second.status_code == 200
    assert len(listener.processed) == 5  # each seen twice, processed once


async def test_connections_are_kept_alive_and_a_closed_one_is_replaced(
        fast: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis,
        listener: WebhookListener) -> None:
    await add_listener(pool, listener.url)
    async with running_worker(fast):
        for count in range(1, 4):
            await emit(pool, arq_redis, fast, payload={"campaign_id": f"c{count}"})
            await wait_until(lambda: settled(pool), what=f"delivery {count}")
        assert listener.connections == 1  # one connection for three deliveries
        await listener.close_idle_connections()  # as a server does after its keep-alive time
        await emit(pool, arq_redis, fast, payload={"campaign_id": "after-close"})
        await wait_until(lambda: settled(pool), what="delivery on a new connection")
    assert listener.connections == 2
    assert [(r["status"], r["attempts"]) for r in await deliveries(pool)] == [
        ("DELIVERED", 1)] * 4  # the closed connection cost no failed attempt
    assert all(r.verify_error is None for r in listener.received)


# The HTTP client itself, against raw HTTP/1.1 answers.

@contextlib.asynccontextmanager
async def raw_server(answers: list[bytes], *, tls: ssl.SSLContext | None = None,
                     ) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server that reads one request per answer (headers and Content-Length body), writes the
    next raw answer (b"" closes the connection without one), and records the requests."""
    requests: list[bytes] = []
    script = list(answers)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while script:
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(next((line.split(b":")[1] for line in head.split(b"\r\n")
                                   if line.lower().startswith(b"content-length")), b"0"))
                requests.append(head + await reader.readexactly(length))
                answer = script.pop(0)
                if not answer:
                    break
                writer.write(answer)
                await writer.drain()
                if b"connection: close" in answer.lower():
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"{'https' if tls else 'http'}://127.0.0.1:{port}/hook?x=1", requests
    finally:
        server.close()


async def _client(settings: Settings) -> tuple[dict[str, Any], webhooks.Http11Client]:
    ctx: dict[str, Any] = {"settings": settings}
    client = await webhooks.setup(ctx)
    assert isinstance(client, webhooks.Http11Client)
    return ctx, client


async def test_http_client_answers(fast: Settings) -> None:
    ctx, client = await _client(fast)
    big = b"x" * 5000
    answers = [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
        b"HTTP/1.1 302 Found\r\nLocation: https://elsewhere.example/hook\r\n"
        b"Content-Length: 0\r\n\r\n",
        b"HTTP/1.1 503 Busy\r\nContent-Length: %d\r\n\r\n%s" % (len(big), big),
    ]
    try:
        async with raw_server(answers) as (url, requests):
            got = [await client.post(url, b'{"a":1}', {"X-Test": str(i)}, 2.0)
                   for i in range(4)]
    finally:
        await webhooks.teardown(ctx)
    assert got[0] == (204, None, Outcome.DELIVERED)
    assert got[1] == (200, None, Outcome.DELIVERED)
    assert got[2] == (302, "HTTP 302: redirected to https://elsewhere.example/hook; redirects "
                      "are not followed, register the final URL", Outcome.REJECTED)
    assert got[3] == (503, "HTTP 503: " + "x" * 512, Outcome.RETRY)
    assert len(requests) == 4
    first = requests[0].split(b"\r\n")
    assert first[0] == b"POST /hook?x=1 HTTP/1.1"
    assert b"Host: 127.0.0.1:" + url.split(":")[2].split("/")[0].encode() in first
    assert first[-1] == b'{"a":1}' and b"Content-Length: 7" in first


async def test_http_client_failures(fast: Settings) -> None:
    ctx, client = await _client(fast)
    try:
        async with raw_server([b""]) as (url, _):  # accepts, reads, closes without an answer
            assert await client.post(url, b"{}", {}, 2.0) == (
                None, "RemoteProtocolError: Server disconnected without sending a response.",
                Outcome.RETRY)
        async with raw_server([b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort"]) as (
                url, _):  # the answer's body is cut short: the 200 is still the answer
            assert await client.post(url, b"{}", {}, 2.0) == (200, None, Outcome.DELIVERED)
        async with raw_server([b"HTTP/1.1 503 Busy\r\nContent-Length: 10\r\n\r\nshort"]) as (
                url, _):  # a refusal cut short is a lost connection, retried
            code, error, outcome = await client.post(url, b"{}", {}, 2.0)
            assert (code, outcome) == (None, Outcome.RETRY)
            assert error is not None and "RemoteProtocolError" in error
        async with raw_server([b"garbage\r\n\r\n"]) as (url, _):
            code, error, outcome = await client.post(url, b"{}", {}, 2.0)
            assert (code, outcome) == (None, Outcome.RETRY)
        code, error, outcome = await client.post(f"http://127.0.0.1:{free_port()}/x", b"{}",
                                                 {}, 2.0)
        assert (code, outcome) == (None, Outcome.RETRY)
        assert error is not None and error.startswith("ConnectError")
        # Not plain http(s): left to httpx, which reports it as before.
        code, error, outcome = await client.post("ftp://127.0.0.1/x", b"{}", {}, 2.0)
        assert (code, outcome) == (None, Outcome.REJECTED)
        assert error is not None and error.startswith("UnsupportedProtocol")
    finally:
        await webhooks.teardown(ctx)


async def test_http_client_speaks_tls(fast: Settings, tmp_path: Any,
                                      monkeypatch: pytest.MonkeyPatch) -> None:
    authority = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    authority.issue_cert("127.0.0.1").configure_cert(server_context)
    bundle = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(str(bundle))
    ctx, client = await _client(fast)  # trusts certifi's authorities, not the test's
    try:
        async with raw_server([b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"] * 2,
                              tls=server_context) as (url, requests):
            code, error, outcome = await client.post(url, b"{}", {}, 2.0)
            assert (code, outcome) == (None, Outcome.RETRY)
            assert error is not None and "CERTIFICATE_VERIFY_FAILED" in error
            monkeypatch.setenv("SSL_CERT_FILE", str(bundle))
            await webhooks.teardown(ctx)
            ctx, client = await _client(fast)
            assert client is not None
            # certifi's bundle is what httpx trusts by default; SSL_CERT_FILE is honoured too
            code, error, outcome = await client.post(url, b"{}", {}, 2.0)
    finally:
        await webhooks.teardown(ctx)
    assert (code, error, outcome) == (200, None, Outcome.DELIVERED)
    assert len(requests) == 1
