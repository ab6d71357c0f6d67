"""Audit of DESIGN invariant 3 ("Nothing lost") and issue 7 ("a crash mid-batch loses nothing
and double-issues nothing"), on real PostgreSQL, real Redis, real HTTP listeners on loopback
and, where a crash is the point, real `promo serve` / `promo worker` processes killed with
SIGKILL.

Redis "losing" work means deleting this test's own keys (its queue name is in every one of
them: the queue, arq's job, in-progress, retry and result keys), never anything else in the
shared Redis. Workers driven in this process use a pinned clock a little behind the real time
(so anything due by the clock is also due for arq, which defers by the real time); workers in
subprocesses use the real clock, with PROMO_JOB_LEASE_SECONDS at its minimum (5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
import redis.asyncio as aioredis
from arq.connections import ArqRedis
from grpc import aio

from config.settings import Settings
from core.bonuses.definitions import (
    ApprovalMode,
    BonusDefinition,
    DataMode,
    ResultType,
    validate_definition,
)
from core.clock import Clock, FixedClock, SystemClock
from core.customers import Customer, Event
from core.events import EventType
from core.periods import TimeBackPeriod
from core.rounding import RoundingMode
from core.webhook_signature import verify
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import bonuses_pb2_grpc as bpb_grpc
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc
from server.app import Dependencies, start_server
from storage import bonuses as bonus_repo
from storage import customers as customers_repo
from storage import events as events_repo
from storage import queue as queue_module
from storage import webhooks as webhook_repo
from storage.queue import outbox_job_id, queue_after_commit
from tests.conftest import ADMIN_KEY, LISTENER_KEY, RUNTIME_KEY, Api
from tests.e2e.campaign_helpers import create_campaign, set_statuses
from tests.e2e.code_helpers import code_promotion, codes_file, upload
from tests.e2e.promo_helpers import cap, get_reward, promotion, reward_type
from tests.webhook_listener import SECRET, WebhookListener, free_port
from workers import bonuses as _bonus_jobs  # noqa: F401  registers bonus.batch
from workers import campaigns as _campaign_jobs  # noqa: F401  registers campaign jobs
from workers import codes as _code_jobs  # noqa: F401  registers the code-alert sweep hook
from workers import webhooks as _webhook_jobs  # registers webhook.deliver; setup()
from workers.main import build_worker
from workers.outbox import sweep_once

ROOT = Path(__file__).resolve().parents[2]
# Keys with these names are what tests.conftest configures for the in-process servers, so a
# request id answered by one server process is replayed by another.
API_KEYS_JSON = json.dumps([
    {"name": "test-admin", "key": ADMIN_KEY, "roles": ["admin"]},
    {"name": "test-runtime", "key": RUNTIME_KEY, "roles": ["runtime"]},
    {"name": "test-listener", "key": LISTENER_KEY, "roles": ["listener"]},
])


# --- fixtures and helpers ----------------------------------------------------------------------


@pytest.fixture
def clock() -> FixedClock:
    """Pinned ten minutes behind the real time: jobs due by this clock are due for arq too."""
    return FixedClock(datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10))


async def _lose_redis(settings: Settings) -> int:
    """Redis loses everything this test queued (a restart without persistence)."""
    assert settings.redis_url
    client = aioredis.Redis.from_url(settings.redis_url)
    try:
        keys = [k async for k in client.scan_iter(match=f"*{settings.queue_name}*", count=1000)]
        if keys:
            await client.delete(*keys)
        return len(keys)
    finally:
        await client.aclose()


def _ctx(pool: asyncpg.Pool, settings: Settings, clock: Clock, redis: Any) -> dict[str, Any]:
    return {"pool": pool, "settings": settings, "clock": clock, "redis": redis}


async def _burst(settings: Settings, clock: Clock) -> None:
    """A real arq worker (no sweeper) that runs what Redis holds, then stops."""
    worker = build_worker(settings, clock=clock, burst=True, handle_signals=False,
                          run_sweeper=False)
    try:
        await asyncio.wait_for(worker.async_run(), 30)
    finally:
        await worker.close()


async def _drain(pool: asyncpg.Pool, settings: Settings, clock: Clock, redis: ArqRedis,
                 rounds: int = 10) -> None:
    """Sweeper ticks and burst workers until no outbox job due by ``clock`` is pending."""
    for _ in range(rounds):
        await sweep_once(_ctx(pool, settings, clock, redis))
        await _burst(settings, clock)
        due = await pool.fetchval(
            "SELECT count(*) FROM outbox_jobs WHERE status = 'pending' AND due_at <= $1",
            clock.now())
        if due == 0:
            return
    raise AssertionError("the outbox did not drain")


async def _count(pool: asyncpg.Pool, sql: str, *args: Any) -> int:
    return int(await pool.fetchval(sql, *args))


async def _until(check: Callable[[], Awaitable[bool]], *, within: float,
                 what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


async def _until_rearmed_job_ran(pool: asyncpg.Pool, arq_redis: ArqRedis, settings: Settings,
                                 job_id: int, check: Callable[[], Awaitable[bool]],
                                 what: str) -> None:
    """Wait (8 sweeper ticks) for a batch job armed again to have run; on a timeout, say what
    held it: its row (a sweeper's lease) and whether arq still keeps the result of the job id
    it reuses (attempt 0)."""
    try:
        await _until(check, within=8, what=f"{what} (8 sweeper ticks)")
    except AssertionError as exc:
        job = await pool.fetchrow("SELECT status, attempts, locked_until, due_at"
                                  " FROM outbox_jobs WHERE id = $1", job_id)
        kept = await arq_redis.exists(
            "arq:result:" + outbox_job_id(settings.queue_name, job_id, 0))
        raise AssertionError(
            f"{exc}: the re-armed job is {dict(job)} (a sweeper tick leases it for "
            f"{settings.job_lease_seconds} s) while arq still keeps the result of the job id "
            f"it reuses (attempt 0): {bool(kept)}") from None


async def _job_done(pool: asyncpg.Pool, job_id: int) -> bool:
    return await _count(pool, "SELECT count(*) FROM outbox_jobs WHERE id = $1 AND status = 'done'",
                        job_id) == 1


async def _results(pool: asyncpg.Pool, n: int) -> bool:
    return await _count(pool, "SELECT count(*) FROM bonus_results") == n


@contextlib.asynccontextmanager
async def _window_computed(settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis,
                           name: str) -> AsyncIterator[tuple[SystemClock, Any, Any]]:
    """A definition with a 2 s window, two requests whose batch a real worker (with its 1 s
    sweeper, on the real clock) has computed; yields (clock, definition row, first request).
    Afterwards the worker stops and the books must hold 3 results, 3 ledger entries and
    nothing pending."""
    real = SystemClock()
    start = real.now()
    row = await _seed_bonus(pool, _definition(name, window=2), 3, start)
    first = await _request_bonuses(pool, row, ["b0", "b1"], "r1", start)
    assert first.outbox_job_id is not None
    await queue_after_commit(arq_redis, job_id=first.outbox_job_id, due_at=first.due_at,
                             queue_name=settings.queue_name)
    worker = build_worker(settings, clock=real, handle_signals=False, run_sweeper=True)
    task = asyncio.create_task(worker.async_run())
    try:
        await _until(lambda: _results(pool, 2), within=15, what="the window's batch")
        # Its results commit before the runner marks the job done (a second statement): the
        # tests below need the job finished, not merely its results written (under load the
        # gap between the two was long enough for a request to find the job still running).
        await _until(lambda: _job_done(pool, first.outbox_job_id), within=15,
                     what="the window's batch job to be marked done")
        yield real, row, first
    finally:
        await worker.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    books = await _bonus_books(pool)
    assert (books["results"], books["ledger"], books["pending"]) == (3, 3, 0)


async def _add_listener(pool: asyncpg.Pool, url: str, event_type: EventType,
                        now: datetime) -> int:
    async with pool.acquire() as conn:
        row = await webhook_repo.insert_listener(conn, event_type=int(event_type), url=url,
                                                 secret=SECRET, active=True,
                                                 description="audit", now=now)
    return row.id


def _valid(listener: WebhookListener, event_type: int | None = None) -> list[dict[str, Any]]:
    """Bodies the listener accepted (signature valid), repeats included."""
    out = []
    for r in listener.received:
        if r.verify_error is not None:
            continue
        body = json.loads(r.body)
        if event_type is None or body["event_type"] == event_type:
            out.append(body)
    return out


@contextlib.asynccontextmanager
async def _server(settings: Settings, pool: asyncpg.Pool, clock: Clock,
                  redis: Any) -> AsyncIterator[tuple[Api, Any]]:
    """A real in-process gRPC server that queues outbox jobs on ``redis`` after each commit."""
    running = await start_server(settings, Dependencies(pool=pool, clock=clock, redis=redis))
    channel = aio.insecure_channel(running.address)
    await asyncio.wait_for(channel.channel_ready(), timeout=5)
    try:
        yield Api(channel=channel, address=running.address), running
    finally:
        await channel.close()
        await running.stop(0)


def _definition(definition_id: str, *, approval: ApprovalMode = ApprovalMode.AUTOMATIC,
                window: int | None = None) -> BonusDefinition:
    return BonusDefinition(
        definition_id=definition_id, display_name="", formula="sum(deposit.amount) * 10%",
        result_type=ResultType.AMOUNT, points_target=None, min_allowed=None, cap_amount=None,
        rounding=RoundingMode.NONE, decimals=2, rounding_factor=None,
        data_mode=DataMode.TRANSACTIONS_AND_PROPERTIES, period=TimeBackPeriod(1, "days"),
        approval_mode=approval, batch_window_seconds=window)


async def _seed_bonus(pool: asyncpg.Pool, d: BonusDefinition, customers: int, now: datetime,
                      *, skip_every: int = 0) -> bonus_repo.DefinitionRow:
    """Customers b0..b{n-1} (EUR); customer i deposits 10*(i+1) an hour before ``now``, except
    every ``skip_every``-th, who deposits nothing (a SKIPPED result)."""
    checked, compiled = validate_definition(d)
    async with pool.acquire() as conn, conn.transaction():
        await customers_repo.upsert(conn, [Customer(f"b{i}", "UTC", "EUR", {})
                                           for i in range(customers)])
        await events_repo.insert_batch(conn, [
            Event(f"e{i}", f"b{i}", "deposit", Decimal(10 * (i + 1)), "EUR",
                  now - timedelta(hours=1))
            for i in range(customers) if not (skip_every and i % skip_every == 0)],
            create_missing=False)
        return await bonus_repo.insert_definition(conn, checked, compiled, now=now)


async def _request_bonuses(pool: asyncpg.Pool, row: bonus_repo.DefinitionRow,
                           customers: list[str], key: str, now: datetime,
                           default_window: int = 300) -> bonus_repo.Accepted:
    async with pool.acquire() as conn, conn.transaction():
        return await bonus_repo.add_requests(
            conn, row, [bonus_repo.NewRequest(c, f"{key}/{c}") for c in customers], now=now,
            default_window=default_window)


async def _bonus_books(pool: asyncpg.Pool) -> dict[str, int]:
    """Every count that must come out exactly once per request."""
    return {
        "requests": await _count(pool, "SELECT count(*) FROM bonus_requests"),
        "pending": await _count(
            pool, "SELECT count(*) FROM bonus_requests WHERE status = 'PENDING'"),
        "results": await _count(pool, "SELECT count(*) FROM bonus_results"),
        "results_per_request": await _count(
            pool, "SELECT count(DISTINCT request_pk) FROM bonus_results"),
        "done_without_result": await _count(
            pool, """SELECT count(*) FROM bonus_requests q WHERE q.status = 'DONE'
                       AND NOT EXISTS (SELECT 1 FROM bonus_results r WHERE r.request_pk = q.id)"""),
        "issued": await _count(
            pool, "SELECT count(*) FROM bonus_results WHERE status = 'ISSUED'"),
        "skipped": await _count(
            pool, "SELECT count(*) FROM bonus_results WHERE status = 'SKIPPED'"),
        "ledger": await _count(pool, "SELECT count(*) FROM bonus_ledger"),
        "ledger_bonuses": await _count(pool, "SELECT count(DISTINCT bonus_id) FROM bonus_ledger"),
        "events": await _count(
            pool, "SELECT count(*) FROM webhook_events WHERE event_type IN (110, 111, 112)"),
        "event_keys": await _count(
            pool, "SELECT count(DISTINCT dedup_key) FROM webhook_events"
                  " WHERE event_type IN (110, 111, 112)"),
    }


# Real processes --------------------------------------------------------------------------------


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    env.update(PROMO_DATABASE_URL=settings.database_url or "",
               PROMO_REDIS_URL=settings.redis_url or "", PROMO_QUEUE_NAME=settings.queue_name,
               PROMO_MIGRATE_ON_START="false", PROMO_LOG_FORMAT="text",
               PROMO_LOG_LEVEL="WARNING", PROMO_DB_POOL_MIN_SIZE="1",
               PROMO_JOB_LEASE_SECONDS="5", PROMO_SWEEPER_INTERVAL_SECONDS="1",
               PROMO_JOB_RETRY_BASE_SECONDS="0.05", PROMO_JOB_RETRY_MAX_SECONDS="0.5",
        PROMO_WEBHOOK_RETRY_MAX_SECONDS="0.5",
               PROMO_API_KEYS=API_KEYS_JSON)
    env.update(extra)
    return env


async def _spawn(env: dict[str, str], *args: str, prelude: str = "") -> asyncio.subprocess.Process:
    """The real `promo` command (``python -m cli.main ...``); with ``prelude``, that Python code
    runs first in the same process (to slow a step down, never to change what it does)."""
    if prelude:
        code = prelude + "\nimport sys\nfrom cli.main import main\nsys.argv = ['promo', " + \
            ", ".join(repr(a) for a in args) + "]\nmain()\n"
        argv = [sys.executable, "-c", code]
    else:
        argv = [sys.executable, "-m", "cli.main", *args]
    return await asyncio.create_subprocess_exec(
        *argv, env=env, cwd=ROOT, stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL)


async def _sigkill(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGKILL)
    await asyncio.wait_for(proc.wait(), 10)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            await _sigkill(proc)


# --- Redis loses queued work: the sweeper re-creates it from PostgreSQL -------------------------


async def test_a_webhook_redis_lost_is_delivered_once_by_the_sweeper(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis, clock: FixedClock,
        listener: WebhookListener) -> None:
    await _add_listener(pool, listener.url, EventType.CAMPAIGN_EXECUTED, clock.now())
    async with pool.acquire() as conn, conn.transaction():
        emitted = await webhook_repo.emit_event(conn, event_type=EventType.CAMPAIGN_EXECUTED,
                                                payload={"campaign_id": "lost"},
                                                now=clock.now())
    assert emitted is not None
    [job_id] = emitted.outbox_job_ids
    await queue_after_commit(arq_redis, job_id=job_id, due_at=clock.now(),
                             queue_name=settings.queue_name)
    assert await arq_redis.zcard(settings.queue_name) == 1
    assert await _lose_redis(settings) >= 1
    assert await arq_redis.zcard(settings.queue_name) == 0

    await _drain(pool, settings, clock, arq_redis)
    await _drain(pool, settings, clock, arq_redis)  # more ticks: nothing more is sent

    assert [r.event_id for r in listener.received] == [emitted.event_id]
    assert listener.received[0].verify_error is None
    row = await pool.fetchrow("SELECT status, attempts FROM webhook_deliveries")
    assert (row["status"], row["attempts"]) == ("DELIVERED", 1)
    job = await pool.fetchrow("SELECT status, attempts FROM outbox_jobs WHERE id = $1", job_id)
    assert (job["status"], job["attempts"]) == ("done", 1)


async def test_a_straggler_rearms_its_finished_batch_and_is_computed_within_a_few_ticks(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis) -> None:
    """docs/bonuses.md: a request that joins a window whose batch has already run "arms that
    job again, due now", and every sweeper tick re-arms a closed window that still has pending
    requests. Real time, a real worker with its sweeper (1 s ticks), the server's
    queue-after-commit: the straggler must not wait for anything but the sweeper."""
    async with _window_computed(settings, pool, arq_redis, "straggle") as (real, row, first):
        # A request made "as of" a time inside the closed window (a late schedule run), as
        # the server does: the same transaction re-arms the batch, then queue after commit.
        late = await _request_bonuses(pool, row, ["b2"], "late",
                                      first.window_start + timedelta(milliseconds=500))
        assert late.outbox_job_id == first.outbox_job_id  # the finished job, armed again
        await queue_after_commit(arq_redis, job_id=late.outbox_job_id, due_at=real.now(),
                                 queue_name=settings.queue_name)
        await _until_rearmed_job_ran(pool, arq_redis, settings, late.outbox_job_id,
                                     lambda: _results(pool, 3), "the straggler's result")


async def test_an_armed_bonus_batch_redis_lost_is_computed_once_by_the_sweeper(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis, clock: FixedClock,
        listener: WebhookListener) -> None:
    row = await _seed_bonus(pool, _definition("armed", window=60), 6, clock.now(), skip_every=3)
    await _add_listener(pool, listener.url, EventType.BONUS_ISSUED, clock.now())
    async with _server(settings, pool, clock, arq_redis) as (api, _):
        reply = await bpb_grpc.BonusServiceStub(api.channel).RequestBonusCalculation(
            bpb.RequestBonusCalculationRequest(request_id="armed-1", definition_id="armed",
                                               customer_ids=[f"b{i}" for i in range(6)]),
            metadata=api.key("runtime"))
    assert reply.accepted_count == 6
    assert await arq_redis.zcard(settings.queue_name) == 1  # the window's batch job
    await _lose_redis(settings)
    clock.set(reply.due_time.ToDatetime(tzinfo=UTC))  # the window closes

    await _drain(pool, settings, clock, arq_redis)
    clock.advance(timedelta(seconds=5))
    await _drain(pool, settings, clock, arq_redis)

    books = await _bonus_books(pool)
    assert books == {"requests": 6, "pending": 0, "results": 6, "results_per_request": 6,
                     "done_without_result": 0, "issued": 4, "skipped": 2, "ledger": 4,
                     "ledger_bonuses": 4, "events": 10, "event_keys": 10}, books
    assert row.pk == await pool.fetchval("SELECT definition_pk FROM bonus_results LIMIT 1")
    issued = _valid(listener, int(EventType.BONUS_ISSUED))
    assert len(issued) == 4 and len({e["event_id"] for e in issued}) == 4
    assert await _count(pool, "SELECT count(*) FROM outbox_jobs WHERE status <> 'done'") == 0


async def test_a_due_clearance_notification_redis_lost_reaches_the_listener_once(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis, clock: FixedClock,
        listener: WebhookListener) -> None:
    """The T-30 (here T-120 s) scheduled-campaign event and the execution, both queued by the
    server and then lost by Redis: the sweeper re-creates each, the listener hears type 5 once,
    its approvals are honoured by the execution, and type 100 arrives once."""
    lead = settings.model_copy(update={"clearance_lead_seconds": 120})
    await _add_listener(pool, listener.url, EventType.SCHEDULED_CAMPAIGN, clock.now())
    await _add_listener(pool, listener.url, EventType.CAMPAIGN_EXECUTED, clock.now())
    execute_at = clock.now() + timedelta(seconds=180)
    async with _server(lead, pool, clock, arq_redis) as (api, _):
        await reward_type(api)
        await promotion(api)
        await create_campaign(api, "lost-notify", execute_at, customers=["a", "b", "c"])
        assert await arq_redis.zcard(lead.queue_name) == 2  # notification and execution
        await _lose_redis(lead)

        clock.set(execute_at - timedelta(seconds=120))  # T - lead: the notification is due
        await _drain(pool, lead, clock, arq_redis)
        clock.advance(timedelta(seconds=1))
        await _drain(pool, lead, clock, arq_redis)
        notices = _valid(listener, 5)
        assert [n["data"]["campaign_id"] for n in notices] == ["lost-notify"]
        reply = await set_statuses(api, "lost-notify", {"a": True, "b": True, "c": False},
                                   "approve-ab")
        assert reply.updated == 3

        await _lose_redis(lead)  # and again, before the execution
        clock.set(execute_at)
        await _drain(pool, lead, clock, arq_redis)
        clock.advance(timedelta(seconds=1))
        await _drain(pool, lead, clock, arq_redis)
        executed = _valid(listener, 100)
        assert len(executed) == 1
        assert (executed[0]["data"]["approved_count"],
                executed[0]["data"]["rejected_count"]) == (2, 1)
        assert len(_valid(listener, 5)) == 1  # never notified twice
        granted = {c: (await get_reward(api, c, campaign_id="lost-notify")).HasField("grant")
                   for c in "abc"}
    assert granted == {"a": True, "b": True, "c": False}
    assert await _count(pool, "SELECT count(*) FROM outbox_jobs WHERE status <> 'done'") == 0



async def test_a_request_left_pending_by_a_finishing_batch_is_rearmed_and_computed_promptly(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis) -> None:
    """docs/bonuses.md: "every sweeper tick re-arms the job of any closed window that still has
    pending requests (one that committed while its batch was finishing)". The state that race
    leaves (a PENDING request, its window's job done) is made directly; a real worker with its
    sweeper (1 s ticks) on the real clock must compute it within a few ticks."""
    async with _window_computed(settings, pool, arq_redis, "raced") as (_, _, first):
        await pool.execute(
            """INSERT INTO bonus_requests (definition_pk, request_key, customer_id, window_start,
                                           request_time, period_start, period_end, source,
                                           period_revision)
               SELECT definition_pk, 'raced/b2', 'b2', window_start, request_time, period_start,
                      period_end, source, period_revision
                 FROM bonus_requests WHERE customer_id = 'b0'""")
        await _until_rearmed_job_ran(pool, arq_redis, settings, first.outbox_job_id,
                                     lambda: _results(pool, 3), "the raced request's result")


async def test_a_webhook_retry_redis_lost_is_sent_at_its_retry_time_by_the_sweeper(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis, clock: FixedClock,
        listener: WebhookListener) -> None:
    from workers.outbox import run_outbox_job

    listener.answer(503)
    await _add_listener(pool, listener.url, EventType.CAMPAIGN_EXECUTED, clock.now())
    async with pool.acquire() as conn, conn.transaction():
        emitted = await webhook_repo.emit_event(conn, event_type=EventType.CAMPAIGN_EXECUTED,
                                                payload={"campaign_id": "retry"},
                                                now=clock.now())
    assert emitted is not None
    [job_id] = emitted.outbox_job_ids
    ctx = _ctx(pool, settings, clock, arq_redis)
    await _webhook_jobs.setup(ctx)
    try:
        assert await run_outbox_job(ctx, job_id) == "pending"  # 503: a retry is queued
    finally:
        await _webhook_jobs.teardown(ctx)
    assert await arq_redis.zcard(settings.queue_name) == 1
    await _lose_redis(settings)
    clock.advance(timedelta(seconds=2))  # past the retry time (backoff at most 0.5 s here)

    await _drain(pool, settings, clock, arq_redis)
    clock.advance(timedelta(seconds=5))
    await _drain(pool, settings, clock, arq_redis)
    assert [r.event_id for r in listener.received] == [emitted.event_id] * 2
    row = await pool.fetchrow("SELECT status, attempts FROM webhook_deliveries")
    assert (row["status"], row["attempts"]) == ("DELIVERED", 2)


# --- a server dies between its commit and what should follow ----------------------------------


class _HangingRedis:
    """An arq pool whose enqueue never returns: the server process is stuck (then killed)
    right after its transaction committed, before it queued anything or replied. (Queueing
    after commit gives up after storage.queue.QUEUE_TIMEOUT_SECONDS; the tests that use this
    raise that limit, so the process stays stuck as a hung one would.)"""

    def __init__(self) -> None:
        self.called = asyncio.Event()

    async def enqueue_job(self, *args: Any, **kwargs: Any) -> None:
        self.called.set()
        await asyncio.Event().wait()


async def test_an_approval_committed_before_the_server_died_is_kept_and_announced_once(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis, clock: FixedClock,
        listener: WebhookListener, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(queue_module, "QUEUE_TIMEOUT_SECONDS", 3600.0)
    row = await _seed_bonus(pool, _definition("manual", approval=ApprovalMode.MANUAL), 3,
                            clock.now())
    accepted = await _request_bonuses(pool, row, ["b0", "b1", "b2"], "m1", clock.now())
    clock.set(accepted.due_at)
    await _drain(pool, settings, clock, arq_redis)  # the batch: three CALCULATED results
    ids = [str(r["bonus_id"]) for r in await pool.fetch(
        "SELECT bonus_id FROM bonus_results WHERE status = 'CALCULATED' ORDER BY customer_id")]
    assert len(ids) == 3
    await _add_listener(pool, listener.url, EventType.BONUS_ISSUED, clock.now())
    clock.advance(timedelta(minutes=1))

    stuck = _HangingRedis()
    request = bpb.ApproveBonusResultsRequest(request_id="approve-two", bonus_ids=ids[:2])
    async with _server(settings, pool, clock, stuck) as (api, _):
        with pytest.raises(grpc.RpcError) as err:
            await bpb_grpc.BonusServiceStub(api.channel).ApproveBonusResults(
                request, metadata=api.key(), timeout=3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert stuck.called.is_set()
    # The process is gone; the operator's client retries with the same request id.
    async with _server(settings, pool, clock, arq_redis) as (api, _):
        retried = await bpb_grpc.BonusServiceStub(api.channel).ApproveBonusResults(
            request, metadata=api.key(), timeout=10)
    assert [r.status for r in retried.results] == [bpb.BONUS_STATUS_ISSUED] * 2
    assert sorted(r.bonus_id for r in retried.results) == sorted(ids[:2])
    await _drain(pool, settings, clock, arq_redis)
    clock.advance(timedelta(seconds=5))
    await _drain(pool, settings, clock, arq_redis)
    assert await _count(pool, "SELECT count(*) FROM bonus_ledger") == 2
    assert await _count(pool, "SELECT count(*) FROM webhook_events WHERE event_type = 112") == 2
    issued = _valid(listener, int(EventType.BONUS_ISSUED))
    assert sorted(e["data"]["bonus_id"] for e in issued) == sorted(ids[:2])
    assert await _count(pool, "SELECT count(*) FROM bonus_results WHERE status = 'CALCULATED'") == 1


async def test_a_code_pool_alert_left_by_a_dead_server_is_sent_once_by_the_sweeper(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis, clock: FixedClock,
        listener: WebhookListener, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grant that empties a pool records the DEPLETED alert in its own transaction; the
    server dies before its background dispatch (here: the dispatch never happens)."""
    import server.code_alerts

    async def died(deps: Any) -> int:
        return 0

    monkeypatch.setattr(server.code_alerts, "dispatch_now", died)
    await _add_listener(pool, listener.url, EventType.CODE_POOL_DEPLETED, clock.now())
    async with _server(settings, pool, clock, arq_redis) as (api, _):
        await code_promotion(api, "FLASH")
        await upload(api, "FLASH", codes_file("FL", 2), "upload-1")
        answers = [await get_reward(api, f"cust-{i}", "FLASH") for i in range(3)]
    assert [a.HasField("grant") for a in answers] == [True, True, False]
    assert await _count(pool, "SELECT count(*) FROM code_pool_alerts WHERE emitted_at IS NULL") \
        == 1
    assert listener.received == []

    await _drain(pool, settings, clock, arq_redis)
    clock.advance(timedelta(seconds=5))
    await _drain(pool, settings, clock, arq_redis)
    depleted = _valid(listener, int(EventType.CODE_POOL_DEPLETED))
    assert [d["data"]["promotion_code"] for d in depleted] == ["FLASH"]
    assert await _count(pool, "SELECT count(*) FROM webhook_events WHERE event_type = 102") == 1
    assert await _count(pool, "SELECT count(*) FROM code_pool_alerts WHERE emitted_at IS NULL") \
        == 0



async def test_a_campaign_created_just_before_the_server_died_is_still_announced_once(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis, clock: FixedClock,
        listener: WebhookListener, monkeypatch: pytest.MonkeyPatch) -> None:
    """CreateCampaign commits (campaign, targets, both outbox jobs), then the server hangs and
    dies before queueing them or replying. The retry with the same request id answers the same
    campaign and adds no job; the sweeper announces it once."""
    monkeypatch.setattr(queue_module, "QUEUE_TIMEOUT_SECONDS", 3600.0)
    lead = settings.model_copy(update={"clearance_lead_seconds": 120})
    await _add_listener(pool, listener.url, EventType.SCHEDULED_CAMPAIGN, clock.now())
    execute_at = clock.now() + timedelta(seconds=180)
    async with _server(lead, pool, clock, arq_redis) as (api, _):
        await reward_type(api)
        await promotion(api)
    stuck = _HangingRedis()
    request = cpb.CreateCampaignRequest(
        request_id="create-doomed", customer_ids=["a", "b"], campaign=cpb.Campaign(
            campaign_id="doomed", name="Doomed", conditional_execution=True,
            promotion_codes=["VIP25"]))
    request.campaign.execute_at.FromDatetime(execute_at)
    async with _server(lead, pool, clock, stuck) as (api, _):
        with pytest.raises(grpc.RpcError) as err:
            await cpb_grpc.CampaignServiceStub(api.channel).CreateCampaign(
                request, metadata=api.key(), timeout=3)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    async with _server(lead, pool, clock, arq_redis) as (api, _):
        again = await cpb_grpc.CampaignServiceStub(api.channel).CreateCampaign(
            request, metadata=api.key(), timeout=10)
    assert again.campaign.campaign_id == "doomed"
    assert await _count(pool, "SELECT count(*) FROM campaigns") == 1
    assert await _count(pool, "SELECT count(*) FROM outbox_jobs WHERE kind LIKE 'campaign.%'") \
        == 2
    clock.set(execute_at - timedelta(seconds=120))
    await _drain(pool, lead, clock, arq_redis)
    clock.advance(timedelta(seconds=1))
    await _drain(pool, lead, clock, arq_redis)
    assert [n["data"]["campaign_id"] for n in _valid(listener, 5)] == ["doomed"]


# --- real processes killed with SIGKILL ----------------------------------------------------------

# Prelude of the first worker of the SIGKILL batch test: smaller chunks, two writers, and each
# chunk's transaction held open 0.15 s longer, so the kill lands between chunk commits. What a
# chunk writes, and how, is unchanged.
_SLOW_CHUNKS = """
import asyncio
import storage.bonuses as b
b.WRITE_CHUNK = 100
b.PARALLEL_WRITES_FROM = 400
_emit = b.emit_events
async def _slow_emit(*args, **kwargs):
    written = await _emit(*args, **kwargs)
    await asyncio.sleep(0.15)
    return written
b.emit_events = _slow_emit
"""


async def test_a_worker_sigkilled_mid_bonus_batch_then_restarted_loses_and_doubles_nothing(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis) -> None:
    n = 1500
    now = datetime.now(UTC)
    row = await _seed_bonus(pool, _definition("big", window=1), n, now, skip_every=10)
    # A listener of the Skipped events (150 of them): the deliveries of chunks that committed
    # before the kill were never queued by the dead worker (it queues after the whole batch).
    listener = await WebhookListener().start()  # the real clock, as the worker processes
    await _add_listener(pool, listener.url, EventType.BONUS_SKIPPED, now)
    accepted = await _request_bonuses(pool, row, [f"b{i}" for i in range(n)], "big",
                                      now - timedelta(seconds=3))  # a window already closed
    assert accepted.accepted == n and accepted.outbox_job_id is not None
    await queue_after_commit(arq_redis, job_id=accepted.outbox_job_id, due_at=accepted.due_at,
                             queue_name=settings.queue_name)
    env = _env(settings)

    doomed = await _spawn(env, "worker", prelude=_SLOW_CHUNKS)
    try:
        async def some_written() -> bool:
            return await _count(pool, "SELECT count(*) FROM bonus_results") > 0

        await _until(some_written, within=30, what="the first committed chunk")
    finally:
        await _sigkill(doomed)
    at_kill = await _bonus_books(pool)
    assert 0 < at_kill["results"] < n, f"the kill did not land mid-batch: {at_kill}"
    # Whatever committed is whole: result, DONE request, ledger entry and events together.
    assert at_kill["done_without_result"] == 0
    assert at_kill["results"] == at_kill["results_per_request"] == n - at_kill["pending"]
    assert at_kill["ledger"] == at_kill["issued"]
    assert at_kill["events"] == 2 * at_kill["issued"] + at_kill["skipped"]

    restarted = await _spawn(env, "worker")
    try:
        async def all_done() -> bool:
            return await _count(
                pool, "SELECT count(*) FROM bonus_requests WHERE status = 'PENDING'") == 0

        await _until(all_done, within=40, what="the restarted worker to finish the batch")

        async def jobs_settled() -> bool:
            return await _count(
                pool, "SELECT count(*) FROM outbox_jobs WHERE status <> 'done'") == 0

        await _until(jobs_settled, within=20,
                     what="the batch job and every Skipped delivery to be done")
    finally:
        await _stop(restarted)
        await listener.stop()
    books = await _bonus_books(pool)
    skipped = len(range(0, n, 10))
    assert books == {"requests": n, "pending": 0, "results": n, "results_per_request": n,
                     "done_without_result": 0, "issued": n - skipped, "skipped": skipped,
                     "ledger": n - skipped, "ledger_bonuses": n - skipped,
                     "events": 2 * (n - skipped) + skipped,
                     "event_keys": 2 * (n - skipped) + skipped}, books
    skipped_events = {str(r["event_id"]) for r in await pool.fetch(
        "SELECT event_id FROM webhook_events WHERE event_type = 110")}
    assert len(skipped_events) == skipped
    assert set(listener.processed) == skipped_events  # each one delivered (at least once)
    assert all(r.verify_error is None for r in listener.received)
    assert await _count(pool, "SELECT count(*) FROM webhook_deliveries"
                              " WHERE status = 'DELIVERED'") == skipped
    total = await pool.fetchval("SELECT sum(amount) FROM bonus_ledger")
    assert total == sum(Decimal(i + 1) for i in range(n) if i % 10)  # 10% of 10*(i+1)
    assert await _count(pool, """
        SELECT count(*) FROM webhook_events e
         WHERE e.event_type IN (110, 111, 112) AND NOT EXISTS (
               SELECT 1 FROM bonus_results r
                WHERE r.bonus_id::text = e.body::jsonb #>> '{data,bonus_id}')""") == 0


async def test_a_worker_sigkilled_after_the_listener_got_the_webhook_resends_the_same_event(
        settings: Settings, pool: asyncpg.Pool, arq_redis: ArqRedis) -> None:
    """docs/webhooks.md: at least once, with the same Promo-Event-Id and the same body on every
    attempt. The worker process is SIGKILLed while the listener holds the request (it has the
    event; the worker never hears the 200); a restarted worker sends it again after the lease."""
    listener = await WebhookListener().start()  # the real clock, as the worker processes
    try:
        listener.answer("hang")
        now = datetime.now(UTC)
        await _add_listener(pool, listener.url, EventType.SCHEDULED_CAMPAIGN, now)
        async with pool.acquire() as conn, conn.transaction():
            emitted = await webhook_repo.emit_event(
                conn, event_type=EventType.SCHEDULED_CAMPAIGN, now=now,
                payload={"campaign_id": "kill-9"})
        assert emitted is not None
        [job_id] = emitted.outbox_job_ids
        await queue_after_commit(arq_redis, job_id=job_id, due_at=now,
                                 queue_name=settings.queue_name)
        env = _env(settings)
        doomed = await _spawn(env, "worker")
        try:
            await asyncio.wait_for(listener.hung.wait(), 30)
        finally:
            await _sigkill(doomed)
        listener.release.set()
        row = await pool.fetchrow("SELECT status, attempts FROM webhook_deliveries")
        assert (row["status"], row["attempts"]) == ("PENDING", 1)

        restarted = await _spawn(env, "worker")
        try:
            async def delivered() -> bool:
                return await pool.fetchval("SELECT status FROM webhook_deliveries") == \
                    "DELIVERED"

            await _until(delivered, within=30, what="the delivery after the restart")
        finally:
            await _stop(restarted)
    finally:
        await listener.stop()
    first, second = listener.received
    assert first.event_id == second.event_id == emitted.event_id
    assert first.body == second.body
    assert (first.verify_error, second.verify_error) == (None, None)
    verify(SECRET, second.headers, second.body, now=int(time.time()))
    assert (first.duplicate, second.duplicate) == (False, True)
    attempts = await pool.fetch("SELECT attempt, error, status_code FROM webhook_attempts"
                                " ORDER BY attempt")
    assert [a["attempt"] for a in attempts] == [1, 2]
    assert (attempts[0]["error"] or "").startswith("interrupted")
    assert attempts[1]["status_code"] == 200
    assert await pool.fetchval("SELECT status FROM outbox_jobs WHERE id = $1", job_id) == "done"


@pytest.mark.parametrize("kind", ["budget", "codes"])
async def test_a_server_sigkilled_under_get_reward_load_loses_no_grant_and_replays_each(
        settings: Settings, pool: asyncpg.Pool, api: Api, kind: str) -> None:
    """Grants committed just before the kill (their reply lost or not) are the ones a retry
    with the same request id gets back; none is lost, none is made twice; the budget counter
    is the sum of the grants, and (personalized codes) no code is handed out twice or lost
    from the pool's count."""
    customers = [f"load-{i:04d}" for i in range(600)]
    if kind == "budget":
        await reward_type(api)
        await promotion(api, caps=[cap(ppb.CAP_PERIOD_LIFETIME, "1000000")])
        code = "VIP25"
    else:
        code = "CODES"
        await code_promotion(api, code)
        await upload(api, code, codes_file("CD", len(customers) + 100), "upload-codes")
    answered: dict[str, rpb.GetRewardResponse] = {}
    failed: list[str] = []

    async def start(port: int) -> tuple[asyncio.subprocess.Process, aio.Channel]:
        proc = await _spawn(_env(settings, PROMO_GRPC_PORT=str(port)), "serve")
        channel = aio.insecure_channel(f"127.0.0.1:{port}")
        await asyncio.wait_for(channel.channel_ready(), 30)
        return proc, channel

    proc, channel = await start(free_port())
    stub = rpb_grpc.RewardServiceStub(channel)
    todo = list(reversed(customers))

    async def client() -> None:
        while todo:
            customer = todo.pop()
            try:
                answered[customer] = await stub.GetReward(rpb.GetRewardRequest(
                    promotion_code=code, customer_id=customer, request_id=f"rid-{customer}"),
                    metadata=api.key("runtime"), timeout=10)
            except grpc.RpcError:
                failed.append(customer)

    async def enough() -> bool:
        return len(answered) >= 100

    clients = [asyncio.create_task(client()) for _ in range(48)]
    try:
        await _until(enough, within=30, what="100 answered calls")
        await _sigkill(proc)
        await asyncio.gather(*clients)
    finally:
        for task in clients:
            task.cancel()
        await channel.close()
        await _sigkill(proc)
    assert failed, "the kill found no call in flight"
    assert all(r.HasField("grant") for r in answered.values())

    proc, channel = await start(free_port())
    try:
        stub = rpb_grpc.RewardServiceStub(channel)
        retried = {c: await stub.GetReward(rpb.GetRewardRequest(
            promotion_code=code, customer_id=c, request_id=f"rid-{c}"),
            metadata=api.key("runtime"), timeout=10) for c in customers}
    finally:
        await channel.close()
        await _stop(proc)
    assert all(r.HasField("grant") for r in retried.values())
    for customer, first in answered.items():  # an answered call's retry: the same grant
        again = retried[customer]
        assert (again.grant.grant_id, again.grant.promo_code, again.existing) == (
            first.grant.grant_id, first.grant.promo_code, True), customer
    rows = await pool.fetch("SELECT id, customer_id, request_id, promo_code FROM grants")
    assert len(rows) == len(customers)
    assert {r["request_id"] for r in rows} == {f"rid-{c}" for c in customers}
    assert {str(r["id"]): r["customer_id"] for r in rows} == {
        retried[c].grant.grant_id: c for c in customers}
    if kind == "budget":
        used = await pool.fetchval("SELECT used FROM cap_usage WHERE scope = 'cashback'")
        assert used == Decimal(15) * len(customers)
    else:
        handed = [r["promo_code"] for r in rows]
        assert len(set(handed)) == len(handed)  # never one code twice
        assert await _count(pool, "SELECT count(*) FROM promo_codes WHERE code = ANY($1)",
                            handed) == len(handed)
        assert await _count(pool, "SELECT allocated FROM code_pools") == len(customers)
