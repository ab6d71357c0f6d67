"""Audit of dependency outages: what the service does while Redis or PostgreSQL is DOWN,
FROZEN or RESTARTED under a running server or worker, as a user running it in production
would expect (DESIGN invariant 3, "Nothing lost": PostgreSQL is the truth, Redis only carries
work a sweeper re-creates).

tests/integration/test_crash_safety_audit.py already covers Redis *losing keys* and processes
SIGKILLed; this file does not redo those. Here the services themselves go away:

- Redis: a redis-server of this test's own (cli.embedded.EmbeddedRedis on a fixed free port),
  stopped and started again on the same port, or frozen with SIGSTOP (a hung Redis, a network
  partition: connections stay open, nothing answers) and thawed with SIGCONT.
- PostgreSQL: an EmbeddedPostgres of this module's own (run as PROMO_EMBEDDED_PG_USER when the
  tests run as root), a migrated template database, one clone per test; stopped (fast
  shutdown, as a restart or failover does) and started again on the same port.

The shared PostgreSQL and Redis of the test run are never stopped, restarted or flushed: tests
that only take Redis away keep their database there, and tests that only take PostgreSQL away
keep their queue there (under the test's own queue name, deleted afterwards).

Found (each an xfail(strict=True) test below): a hung Redis holds committed mutating calls
past their deadline; a server started during a Redis outage never uses Redis again; `promo
worker` dies with tracebacks on a Redis restart; a PostgreSQL outage is INTERNAL, not
UNAVAILABLE; a GetReward cut by its deadline in PostgreSQL logs "Future exception was never
retrieved". Health stays SERVING during a PostgreSQL outage (documented, not flagged).

Workers driven in this process with pinned clocks use one a little behind the real time (so
anything due by it is also due for arq); workers and listeners that must run on their own use
the real clock, with PROMO_JOB_LEASE_SECONDS at its minimum (5 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import grpc
import pytest
from arq.connections import ArqRedis, RedisSettings
from arq.connections import create_pool as create_arq_pool
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc

from cli.embedded import EmbeddedPostgres, EmbeddedRedis, pick_free_port
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
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import bonuses_pb2_grpc as bpb_grpc
from promo.v1 import campaigns_pb2 as cpb
from promo.v1 import campaigns_pb2_grpc as cpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import promotions_pb2_grpc as ppb_grpc
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc
from server.app import Dependencies, start_server
from server.errors import error_info_of
from storage import bonuses as bonus_repo
from storage import customers as customers_repo
from storage import events as events_repo
from storage import webhooks as webhook_repo
from storage.db import create_pool
from storage.migrate import migrate
from storage.queue import queue_after_commit
from tests.conftest import ADMIN_KEY, LISTENER_KEY, RUNTIME_KEY, Api, open_for_embedded_user
from tests.e2e.campaign_helpers import create_campaign, ts
from tests.e2e.code_helpers import code_promotion, codes_file, upload
from tests.e2e.promo_helpers import cap, get_reward, promotion, reward_type
from tests.webhook_listener import SECRET, WebhookListener
from workers import bonuses as _bonus_jobs  # noqa: F401  registers bonus.batch
from workers import campaigns as _campaign_jobs  # noqa: F401  registers campaign jobs
from workers import codes as _code_jobs  # noqa: F401  registers the code-alert sweep hook
from workers import webhooks as _webhook_jobs  # noqa: F401  registers webhook.deliver
from workers.main import build_worker
from workers.outbox import sweep_once

pytestmark = pytest.mark.embedded

ROOT = Path(__file__).resolve().parents[2]
API_KEYS_JSON = json.dumps([
    {"name": "test-admin", "key": ADMIN_KEY, "roles": ["admin"]},
    {"name": "test-runtime", "key": RUNTIME_KEY, "roles": ["runtime"]},
    {"name": "test-listener", "key": LISTENER_KEY, "roles": ["listener"]},
])


# --- fixtures: a Redis and a PostgreSQL of our own ---------------------------------------------


@pytest.fixture
def clock() -> FixedClock:
    """Pinned ten minutes behind the real time: jobs due by this clock are due for arq too."""
    return FixedClock(datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10))


@dataclass
class OwnRedis:
    """A redis-server of this test's own that may be stopped, started and frozen."""

    server: EmbeddedRedis
    url: str
    frozen: bool = False

    def stop(self) -> None:
        self.thaw()
        self.server.stop()

    def start(self) -> None:
        assert self.server.start() == self.url  # the same port: clients reconnect to it

    def freeze(self) -> None:
        assert self.server.pid is not None
        os.kill(self.server.pid, signal.SIGSTOP)
        self.frozen = True

    def thaw(self) -> None:
        if self.frozen and self.server.pid is not None:
            os.kill(self.server.pid, signal.SIGCONT)
        self.frozen = False


@pytest.fixture
def own_redis() -> Iterator[OwnRedis]:
    base = Path(tempfile.mkdtemp(prefix="promo-outage-redis-"))
    server = EmbeddedRedis(base, port=pick_free_port())
    own = OwnRedis(server=server, url=server.start())
    try:
        yield own
    finally:
        own.stop()
        shutil.rmtree(base, ignore_errors=True)


@dataclass
class OwnPostgres:
    server: EmbeddedPostgres
    maintenance_url: str
    template: str

    def stop(self) -> None:
        self.server.stop()

    def start(self) -> None:
        assert self.server.start() == self.maintenance_url  # same port

    def url(self, name: str) -> str:
        return self.maintenance_url.rsplit("/", 1)[0] + "/" + name


@pytest.fixture(scope="module")
def own_postgres_server() -> Iterator[OwnPostgres]:
    user = os.environ.get("PROMO_EMBEDDED_PG_USER")
    if os.geteuid() == 0 and not user:
        pytest.skip("running as root: set PROMO_EMBEDDED_PG_USER to an unprivileged user")
    base = Path(tempfile.mkdtemp(prefix="promo-outage-pg-"))
    base.chmod(0o755)
    open_for_embedded_user(base)
    server = EmbeddedPostgres(base / "data", run_as_user=user if os.geteuid() == 0 else None,
                              port=pick_free_port())
    url = server.start()
    own = OwnPostgres(server=server, maintenance_url=url, template="outage_tpl")

    async def create_template() -> None:
        admin = await asyncpg.connect(url)
        try:
            await admin.execute(f'CREATE DATABASE "{own.template}"')
        finally:
            await admin.close()
        conn = await asyncpg.connect(own.url(own.template))
        try:
            await migrate(conn)
        finally:
            await conn.close()

    try:
        asyncio.run(create_template())
        yield own
    finally:
        server.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def own_postgres(own_postgres_server: OwnPostgres) -> Iterator[tuple[OwnPostgres, str]]:
    """(the server, the URL of a fresh migrated database of this test's own). Whatever the test
    did, the server is running again afterwards."""
    own = own_postgres_server
    name = f"outage_{uuid.uuid4().hex[:10]}"

    async def run(sql: str) -> None:
        admin = await asyncpg.connect(own.maintenance_url)
        try:
            await admin.execute(sql)
        finally:
            await admin.close()

    asyncio.run(run(f'CREATE DATABASE "{name}" TEMPLATE "{own.template}"'))
    try:
        yield own, own.url(name)
    finally:
        own.start()  # a no-op when running
        asyncio.run(run(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# --- helpers -----------------------------------------------------------------------------------


async def _until(check: Callable[[], Awaitable[bool]], *, within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


async def _count(pool: asyncpg.Pool, sql: str, *args: Any) -> int:
    return int(await pool.fetchval(sql, *args))


def _ctx(pool: asyncpg.Pool, settings: Settings, clock: Clock, redis: Any) -> dict[str, Any]:
    return {"pool": pool, "settings": settings, "clock": clock, "redis": redis}


async def _burst(settings: Settings, clock: Clock) -> None:
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


@contextlib.asynccontextmanager
async def _server(settings: Settings, pool: asyncpg.Pool, clock: Clock,
                  redis: Any) -> AsyncIterator[tuple[Api, Any]]:
    running = await start_server(settings, Dependencies(pool=pool, clock=clock, redis=redis))
    channel = aio.insecure_channel(running.address)
    await asyncio.wait_for(channel.channel_ready(), timeout=5)
    try:
        yield Api(channel=channel, address=running.address), running
    finally:
        await channel.close()
        await running.stop(0)


async def _add_listener(pool: asyncpg.Pool, url: str, event_type: EventType,
                        now: datetime) -> int:
    async with pool.acquire() as conn:
        row = await webhook_repo.insert_listener(conn, event_type=int(event_type), url=url,
                                                 secret=SECRET, active=True,
                                                 description="outage audit", now=now)
    return row.id


async def _emit(pool: asyncpg.Pool, payload: dict[str, Any], now: datetime,
                event_type: EventType = EventType.CAMPAIGN_EXECUTED) -> tuple[str, int]:
    async with pool.acquire() as conn, conn.transaction():
        emitted = await webhook_repo.emit_event(conn, event_type=event_type, payload=payload,
                                                now=now)
    assert emitted is not None
    [job_id] = emitted.outbox_job_ids
    return str(emitted.event_id), job_id


def _definition(definition_id: str, *, approval: ApprovalMode,
                window: int | None = None) -> BonusDefinition:
    return BonusDefinition(
        definition_id=definition_id, display_name="", formula="sum(deposit.amount) * 10%",
        result_type=ResultType.AMOUNT, points_target=None, min_allowed=None, cap_amount=None,
        rounding=RoundingMode.NONE, decimals=2, rounding_factor=None,
        data_mode=DataMode.TRANSACTIONS_AND_PROPERTIES, period=TimeBackPeriod(1, "days"),
        approval_mode=approval, batch_window_seconds=window)


async def _seed_customers(pool: asyncpg.Pool, n: int, now: datetime) -> None:
    """Customers b0..b{n-1}; customer i deposits 10*(i+1) an hour before ``now``."""
    async with pool.acquire() as conn, conn.transaction():
        await customers_repo.upsert(conn, [Customer(f"b{i}", "UTC", "EUR", {})
                                           for i in range(n)])
        await events_repo.insert_batch(conn, [
            Event(f"e{i}", f"b{i}", "deposit", Decimal(10 * (i + 1)), "EUR",
                  now - timedelta(hours=1)) for i in range(n)], create_missing=False)


async def _insert_definition(pool: asyncpg.Pool, d: BonusDefinition,
                             now: datetime) -> bonus_repo.DefinitionRow:
    checked, compiled = validate_definition(d)
    async with pool.acquire() as conn:
        return await bonus_repo.insert_definition(conn, checked, compiled, now=now)


def _received_ids(listener: WebhookListener, event_type: int) -> list[str]:
    out = []
    for r in listener.received:
        assert r.verify_error is None, r.verify_error
        body = json.loads(r.body)
        if body["event_type"] == event_type:
            out.append(body["event_id"])
    return out


async def _timed(call: Awaitable[Any]) -> tuple[Any, float]:
    began = time.monotonic()
    result = await call
    return result, time.monotonic() - began


# Real processes --------------------------------------------------------------------------------


def _env(settings: Settings, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PROMO_")}
    env.update(PROMO_DATABASE_URL=settings.database_url or "",
               PROMO_REDIS_URL=settings.redis_url or "", PROMO_QUEUE_NAME=settings.queue_name,
               PROMO_MIGRATE_ON_START="false", PROMO_LOG_FORMAT="text",
               PROMO_LOG_LEVEL="INFO", PROMO_DB_POOL_MIN_SIZE="1",
               PROMO_JOB_LEASE_SECONDS="5", PROMO_SWEEPER_INTERVAL_SECONDS="1",
               PROMO_JOB_RETRY_BASE_SECONDS="0.05", PROMO_JOB_RETRY_MAX_SECONDS="0.5",
               PROMO_WEBHOOK_RETRY_MAX_SECONDS="0.5", PROMO_API_KEYS=API_KEYS_JSON)
    env.update(extra)
    return env


async def _spawn_worker(env: dict[str, str], log_file: Path) -> asyncio.subprocess.Process:
    with log_file.open("ab") as out:
        return await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "worker", env=env, cwd=ROOT,
            stdout=out, stderr=out)


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), 20)
        except TimeoutError:
            proc.send_signal(signal.SIGKILL)
            await asyncio.wait_for(proc.wait(), 10)


# === 1. Redis unreachable under a running server ================================================


async def test_mutating_calls_answer_while_redis_is_down_and_their_work_runs_once_after(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        listener: WebhookListener, own_redis: OwnRedis) -> None:
    """Redis stops under a running server (a restart, a failover). Campaign creation, a code
    upload, GetReward emptying a code pool (its DEPLETED alert), a bonus request and a bonus
    approval all answer at once and commit whole: their outbox rows wait in PostgreSQL. Once
    Redis is back, the same server's arq pool reconnects (the next call queues at once) and
    every piece of work is done exactly once."""
    s = settings.model_copy(update={"redis_url": own_redis.url, "clearance_lead_seconds": 120})
    redis = await create_arq_pool(RedisSettings.from_dsn(own_redis.url))
    try:
        for event_type in (EventType.SCHEDULED_CAMPAIGN, EventType.CODE_POOL_DEPLETED,
                           EventType.BONUS_ISSUED):
            await _add_listener(pool, listener.url, event_type, clock.now())
        await _seed_customers(pool, 4, clock.now())
        manual = await _insert_definition(pool, _definition("manual",
                                                            approval=ApprovalMode.MANUAL),
                                          clock.now())
        await _insert_definition(pool, _definition("auto", approval=ApprovalMode.AUTOMATIC,
                                                   window=60), clock.now())
        async with pool.acquire() as conn, conn.transaction():
            accepted = await bonus_repo.add_requests(
                conn, manual, [bonus_repo.NewRequest(c, f"m/{c}") for c in ("b0", "b1")],
                now=clock.now(), default_window=300)
        clock.set(accepted.due_at)
        await _drain(pool, s, clock, redis)  # Redis up: two CALCULATED manual results
        calculated = [str(r["bonus_id"]) for r in await pool.fetch(
            "SELECT bonus_id FROM bonus_results WHERE status = 'CALCULATED'")]
        assert len(calculated) == 2
        jobs_before = await _count(pool, "SELECT count(*) FROM outbox_jobs")

        execute_at = clock.now() + timedelta(seconds=180)
        async with _server(s, pool, clock, redis) as (api, _):
            await reward_type(api)
            await promotion(api)
            await code_promotion(api, "FLASH")
            own_redis.stop()

            began = time.monotonic()
            campaign = await create_campaign(api, "during-outage", execute_at,
                                             customers=["a", "b"])
            await upload(api, "FLASH", codes_file("FL", 2), "upload-outage")
            answers = [await get_reward(api, f"cust-{i}", "FLASH") for i in range(3)]
            bonus_stub = bpb_grpc.BonusServiceStub(api.channel)
            requested = await bonus_stub.RequestBonusCalculation(
                bpb.RequestBonusCalculationRequest(request_id="auto-1", definition_id="auto",
                                                   customer_ids=["b2", "b3"]),
                metadata=api.key("runtime"), timeout=10)
            approved = await bonus_stub.ApproveBonusResults(
                bpb.ApproveBonusResultsRequest(request_id="approve-outage", bonus_ids=calculated),
                metadata=api.key(), timeout=10)
            elapsed = time.monotonic() - began
            assert elapsed < 5, f"the calls took {elapsed:.1f} s with Redis down"
            assert campaign.campaign_id == "during-outage"
            assert [a.HasField("grant") for a in answers] == [True, True, False]
            assert requested.accepted_count == 2
            assert [r.status for r in approved.results] == [bpb.BONUS_STATUS_ISSUED] * 2
            # Everything committed, the work waits in PostgreSQL.
            assert await _count(pool, "SELECT count(*) FROM outbox_jobs") > jobs_before
            assert await _count(pool, "SELECT count(*) FROM bonus_ledger") == 2

            own_redis.start()
            # The same server process queues again at once (its arq pool reconnected).
            await create_campaign(api, "after-outage", execute_at, customers=["c"])
            assert await redis.zcard(s.queue_name) >= 2

        clock.set(execute_at - timedelta(seconds=119))  # the notices are due (T - lead)
        await _drain(pool, s, clock, redis)
        clock.advance(timedelta(seconds=5))  # a retried attempt's backoff, before T
        await _drain(pool, s, clock, redis)
        clock.set(execute_at + timedelta(seconds=1))  # the executions and the bonus window
        await _drain(pool, s, clock, redis)
        clock.advance(timedelta(seconds=5))
        await _drain(pool, s, clock, redis)
    finally:
        await redis.aclose()

    notices = [json.loads(r.body)["data"]["campaign_id"] for r in listener.received
               if json.loads(r.body)["event_type"] == int(EventType.SCHEDULED_CAMPAIGN)]
    jobs = [dict(r) for r in await pool.fetch(
        "SELECT id, kind, status, attempts, due_at, last_error FROM outbox_jobs ORDER BY id")]
    assert sorted(notices) == ["after-outage", "during-outage"], jobs
    assert len(_received_ids(listener, int(EventType.CODE_POOL_DEPLETED))) == 1
    issued = _received_ids(listener, int(EventType.BONUS_ISSUED))
    assert len(issued) == 4 and len(set(issued)) == 4  # 2 approved + 2 automatic, once each
    assert not any(r.duplicate for r in listener.received)
    assert await _count(pool, "SELECT count(*) FROM bonus_ledger") == 4
    dead = await pool.fetch("SELECT kind, last_error FROM outbox_jobs WHERE status = 'dead'")
    assert dead == [], dead
    assert await _count(pool, "SELECT count(*) FROM webhook_deliveries"
                              " WHERE status <> 'DELIVERED' OR attempts <> 1") == 0
    assert await _count(pool, "SELECT count(*) FROM outbox_jobs WHERE status <> 'done'") == 0


async def test_get_reward_answers_at_once_while_redis_is_frozen(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        own_redis: OwnRedis) -> None:
    """GetReward never waits on Redis: with Redis hung (SIGSTOP: connections open, nothing
    answers) grants go on, and the grant that empties a code pool, whose DEPLETED alert is
    dispatched in the background, answers at once too."""
    s = settings.model_copy(update={"redis_url": own_redis.url})
    redis = await create_arq_pool(RedisSettings.from_dsn(own_redis.url))
    try:
        async with _server(s, pool, clock, redis) as (api, _):
            await reward_type(api)
            await promotion(api)
            await code_promotion(api, "FLASH")
            await upload(api, "FLASH", codes_file("FL", 1), "upload-1")
            own_redis.freeze()
            stub = rpb_grpc.RewardServiceStub(api.channel)
            for customer, code in (("c1", "VIP25"), ("c2", "FLASH"), ("c3", "FLASH")):
                reply, took = await _timed(stub.GetReward(rpb.GetRewardRequest(
                    promotion_code=code, customer_id=customer, request_id=f"r-{customer}"),
                    metadata=api.key("runtime"), timeout=5))
                assert took < 2, (customer, took)
                assert reply.HasField("grant") == (customer != "c3")
            own_redis.thaw()
    finally:
        own_redis.thaw()
        await redis.aclose()


async def test_a_frozen_redis_does_not_hold_a_committed_mutating_call(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        own_redis: OwnRedis) -> None:
    """storage/queue.py says queueing after commit is "best effort ... never raises": the row
    is safe in PostgreSQL and the sweeper queues it. A Redis that accepts connections but never
    answers (a frozen process, a partition) must not hold the caller's answer either: the
    change is committed, and the caller, seeing DEADLINE_EXCEEDED, can only guess."""
    s = settings.model_copy(update={"redis_url": own_redis.url})
    redis = await create_arq_pool(RedisSettings.from_dsn(own_redis.url))
    try:
        async with _server(s, pool, clock, redis) as (api, _):
            await reward_type(api)
            await promotion(api)
            own_redis.freeze()
            try:
                began = time.monotonic()
                request = cpb.CreateCampaignRequest(
                    request_id="create-frozen", customer_ids=["a"], campaign=cpb.Campaign(
                        campaign_id="frozen", name="Frozen", conditional_execution=True,
                        execute_at=ts(clock.now() + timedelta(hours=1)),
                        promotion_codes=["VIP25"]))
                code = grpc.StatusCode.OK
                try:
                    await cpb_grpc.CampaignServiceStub(api.channel).CreateCampaign(
                        request, metadata=api.key(), timeout=4)
                except grpc.RpcError as exc:
                    code = exc.code()
                took = time.monotonic() - began
                committed = await _count(pool, "SELECT count(*) FROM campaigns")
            finally:
                own_redis.thaw()
        assert committed == 1
        assert (code, took < 3.5) == (grpc.StatusCode.OK, True), (code, took)
    finally:
        own_redis.thaw()
        await redis.aclose()


async def test_a_sweeper_tick_without_redis_frees_its_leases_and_the_next_queues_each_once(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        own_redis: OwnRedis) -> None:
    """docs/operations.md: "a tick that cannot reach Redis frees the rows it claimed, so the
    first tick after Redis is back queues them". The tick fails fast (Redis refuses
    connections) and leaves no lease behind."""
    s = settings.model_copy(update={"redis_url": own_redis.url})
    await _add_listener(pool, "http://127.0.0.1:9/never-called", EventType.CAMPAIGN_EXECUTED,
                        clock.now())
    job_ids = [(await _emit(pool, {"n": i}, clock.now()))[1] for i in range(3)]
    redis = await create_arq_pool(RedisSettings.from_dsn(own_redis.url))
    try:
        own_redis.stop()
        began = time.monotonic()
        with pytest.raises(Exception) as err:
            await sweep_once(_ctx(pool, s, clock, redis))
        assert "connect" in str(err.value).lower() or "Connection" in type(err.value).__name__
        assert time.monotonic() - began < 5
        assert await _count(pool, "SELECT count(*) FROM outbox_jobs WHERE id = ANY($1)"
                                  " AND locked_until IS NULL AND status = 'pending'",
                            job_ids) == 3
        own_redis.start()
        assert await sweep_once(_ctx(pool, s, clock, redis)) == 3
        assert await sweep_once(_ctx(pool, s, clock, redis)) == 0  # leased: not twice
        assert await redis.zcard(s.queue_name) == 3
    finally:
        await redis.aclose()


async def test_a_server_started_while_redis_is_down_answers_and_queues_once_redis_is_back(
        settings: Settings, pool: asyncpg.Pool, own_redis: OwnRedis, tmp_path: Path) -> None:
    """A real `promo serve` started during a Redis outage starts and answers (its outbox rows
    wait in PostgreSQL). Like a server whose Redis went away after its start (first test), it
    should queue work at once when Redis is back, not wait for a worker's sweeper tick
    (PROMO_SWEEPER_INTERVAL_SECONDS, 30 s by default) for as long as it runs."""
    s = settings.model_copy(update={"redis_url": own_redis.url})
    own_redis.stop()
    port = pick_free_port()
    log_file = tmp_path / "serve.log"
    with log_file.open("ab") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", "serve",
            env=_env(s, PROMO_GRPC_PORT=str(port), PROMO_LOG_LEVEL="WARNING",
                     PROMO_SHUTDOWN_GRACE_SECONDS="1"), cwd=ROOT,
            stdout=out, stderr=out)
    channel = aio.insecure_channel(f"127.0.0.1:{port}")
    redis: ArqRedis | None = None
    try:
        await asyncio.wait_for(channel.channel_ready(), 30)
        api = Api(channel=channel, address=f"127.0.0.1:{port}")
        await reward_type(api)
        await promotion(api)
        during = await create_campaign(api, "during", datetime.now(UTC) + timedelta(hours=1),
                                       customers=["a"])
        assert during.campaign_id == "during"
        assert "Redis unreachable" in log_file.read_text()

        own_redis.start()
        redis = await create_arq_pool(RedisSettings.from_dsn(own_redis.url))
        await create_campaign(api, "after", datetime.now(UTC) + timedelta(hours=1),
                              customers=["b"])
        assert await redis.zcard(s.queue_name) == 2, \
            "the notice and execution jobs of a campaign created after Redis came back"
    finally:
        await channel.close()
        await _stop(proc)
        if redis is not None:
            await redis.aclose()


# === 2. A worker whose Redis goes away and comes back ===========================================


@dataclass
class _WorkerProcess:
    """A real `promo worker` on its own Redis that has run one job (so it is up)."""

    proc: asyncio.subprocess.Process
    log_file: Path
    redis: ArqRedis
    queue_name: str

    async def run_job(self, pool: asyncpg.Pool, campaign_id: str, *, within: float,
                      what: str) -> None:
        """Emit an event for the listener, queue its job, wait until the worker ran it."""
        now = datetime.now(UTC)
        _, job_id = await _emit(pool, {"campaign_id": campaign_id}, now)
        await queue_after_commit(self.redis, job_id=job_id, due_at=now,
                                 queue_name=self.queue_name)

        async def done() -> bool:
            return await pool.fetchval("SELECT status FROM outbox_jobs WHERE id = $1",
                                       job_id) == "done"

        await _until(done, within=within, what=what)


@contextlib.asynccontextmanager
async def _worker_up(settings: Settings, pool: asyncpg.Pool, own_redis: OwnRedis,
                     tmp_path: Path) -> AsyncIterator[_WorkerProcess]:
    s = settings.model_copy(update={"redis_url": own_redis.url})
    listener = await WebhookListener().start()  # the real clock, as the worker process
    redis = await create_arq_pool(RedisSettings.from_dsn(own_redis.url))
    worker = _WorkerProcess(await _spawn_worker(_env(s), tmp_path / "worker.log"),
                            tmp_path / "worker.log", redis, s.queue_name)
    try:
        await _add_listener(pool, listener.url, EventType.CAMPAIGN_EXECUTED, datetime.now(UTC))
        await worker.run_job(pool, "before", within=20, what="the worker to run the first job")
        yield worker
    finally:
        own_redis.thaw()
        await _stop(worker.proc)
        await redis.aclose()
        await listener.stop()


async def test_a_worker_survives_a_redis_restart_or_exits_with_one_clear_line(
        settings: Settings, pool: asyncpg.Pool, own_redis: OwnRedis,
        tmp_path: Path) -> None:
    """A real `promo worker` process; its Redis restarts. Either it keeps running and runs
    the work queued after Redis is back, or it stops cleanly: its shutdown ran ("worker
    stopped"), and it says in a log line that Redis went away, without a traceback."""
    async with _worker_up(settings, pool, own_redis, tmp_path) as worker:
        own_redis.stop()

        async def exited() -> bool:
            return worker.proc.returncode is not None

        with contextlib.suppress(AssertionError):
            await _until(exited, within=3, what="the worker to notice")
        own_redis.start()
        if worker.proc.returncode is None:  # it kept running: it must work again
            await worker.run_job(pool, "after", within=15, what=(
                "the same worker to run work queued after Redis came back"))
            assert worker.proc.returncode is None
        else:
            log = worker.log_file.read_text()
            assert "Traceback" not in log, log[-3000:]
            assert "worker stopped" in log, log[-3000:]
            assert "redis" in log.lower()


async def test_a_worker_stopped_while_redis_is_frozen_stops_within_seconds(
        settings: Settings, pool: asyncpg.Pool, own_redis: OwnRedis,
        tmp_path: Path) -> None:
    """A real `promo worker` process is sent SIGTERM while its Redis is hung (SIGSTOP:
    connections open, nothing answers). Its shutdown cannot delete arq's health-check key, and
    waits for that at most workers.main.REDIS_CLOSE_TIMEOUT_SECONDS (2 s) each for the delete
    and the close: it exits within 15 s, its shutdown ran ("worker stopped") and it says that
    Redis was unreachable, without a traceback."""
    async with _worker_up(settings, pool, own_redis, tmp_path) as worker:
        own_redis.freeze()
        began = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(worker.proc.wait(), 15)
        took = time.monotonic() - began
        log = worker.log_file.read_text()
        assert "Traceback" not in log, log[-3000:]
        assert "worker stopped" in log, log[-3000:]
        assert "Redis unreachable while the worker stopped" in log, log[-3000:]
        assert took < 15


async def test_a_delivery_in_flight_when_redis_died_is_delivered_after_it_is_back(
        settings: Settings, pool: asyncpg.Pool, own_redis: OwnRedis,
        tmp_path: Path) -> None:
    """A real `promo worker` is sending a webhook (the listener holds the request) when Redis
    stops. Whatever the worker does about it, once Redis is back and a worker runs (the same
    one if it survived, else a new one, as an orchestrator would start), the delivery is
    DELIVERED, with the same event id on every request (at least once, never lost), and no
    other work is doubled."""
    s = settings.model_copy(update={"redis_url": own_redis.url})
    listener = await WebhookListener().start()
    listener.answer("hang")
    log_file = tmp_path / "worker.log"
    redis = await create_arq_pool(RedisSettings.from_dsn(own_redis.url))
    procs = [await _spawn_worker(_env(s), log_file)]
    try:
        now = datetime.now(UTC)
        await _add_listener(pool, listener.url, EventType.CAMPAIGN_EXECUTED, now)
        event_id, job_id = await _emit(pool, {"campaign_id": "in-flight"}, now)
        await queue_after_commit(redis, job_id=job_id, due_at=now, queue_name=s.queue_name)
        await asyncio.wait_for(listener.hung.wait(), 20)
        own_redis.stop()
        # Work made while Redis is down: its queueing fails, the row waits.
        other_id, other_job = await _emit(pool, {"campaign_id": "while-down"},
                                          datetime.now(UTC))
        await queue_after_commit(redis, job_id=other_job, due_at=datetime.now(UTC),
                                 queue_name=s.queue_name)
        listener.release.set()
        await asyncio.sleep(0.5)  # let the worker notice
        own_redis.start()

        async def settled() -> bool:
            if procs[-1].returncode is not None:  # a supervisor starts a new worker
                procs.append(await _spawn_worker(_env(s), log_file))
            return await _count(pool, "SELECT count(*) FROM webhook_deliveries"
                                      " WHERE status = 'DELIVERED'") == 2

        await _until(settled, within=30, what="both deliveries after Redis came back")
    finally:
        for proc in procs:
            await _stop(proc)
        await redis.aclose()
        await listener.stop()
    ids = [r.event_id for r in listener.received]
    assert set(ids) == {event_id, other_id}
    assert ids.count(other_id) == 1
    assert 1 <= ids.count(event_id) <= 2  # the interrupted send may be repeated, same id
    assert await _count(pool, "SELECT count(*) FROM outbox_jobs WHERE status <> 'done'") == 0


# === 3. PostgreSQL unreachable / restarted under a running server ================================


@contextlib.asynccontextmanager
async def _pg_server(settings: Settings, database_url: str,
                     clock: Clock) -> AsyncIterator[tuple[Api, asyncpg.Pool]]:
    s = settings.model_copy(update={"database_url": database_url})
    db_pool = await create_pool(database_url, min_size=2, max_size=10)
    try:
        async with _server(s, db_pool, clock, None) as (api, _):
            yield api, db_pool
    finally:
        await db_pool.close()


async def _calls_during_outage(api: Api) -> dict[str, tuple[grpc.RpcError | None, float]]:
    """One read, one GetReward and one mutating call; each its error (None: it answered) and
    how long it took."""
    calls: dict[str, Callable[[], Awaitable[Any]]] = {
        "GetReward": lambda: rpb_grpc.RewardServiceStub(api.channel).GetReward(
            rpb.GetRewardRequest(promotion_code="VIP25", customer_id="during",
                                 request_id="r-during"),
            metadata=api.key("runtime"), timeout=10),
        "CreateRewardType": lambda: rtpb_grpc.RewardTypeServiceStub(api.channel)
        .CreateRewardType(rtpb.CreateRewardTypeRequest(
            request_id="rt-during", reward_type=rtpb.RewardType(
                name="points", display_name="Points", category=1)),
            metadata=api.key(), timeout=10),
        "ListPromotions": lambda: ppb_grpc.PromotionServiceStub(api.channel).ListPromotions(
            ppb.ListPromotionsRequest(), metadata=api.key(), timeout=10),
    }
    out: dict[str, tuple[grpc.RpcError | None, float]] = {}
    for name, call in calls.items():
        began = time.monotonic()
        try:
            await call()
            out[name] = (None, time.monotonic() - began)
        except grpc.RpcError as exc:
            out[name] = (exc, time.monotonic() - began)
    return out


async def test_calls_fail_fast_while_postgresql_is_down(
        settings: Settings, own_postgres: tuple[OwnPostgres, str], clock: FixedClock) -> None:
    """PostgreSQL stopped (refusing connections): every call fails within a second or two,
    none hangs until the caller's deadline, none answers as if it had worked."""
    server, url = own_postgres
    async with _pg_server(settings, url, clock) as (api, _):
        await reward_type(api)
        await promotion(api)
        server.stop()
        results = await _calls_during_outage(api)
        server.start()
    for name, (error, took) in results.items():
        assert error is not None, f"{name} answered with PostgreSQL down"
        assert error.code() != grpc.StatusCode.DEADLINE_EXCEEDED, name
        assert took < 3, (name, took)


async def test_calls_while_postgresql_is_down_are_unavailable_with_a_human_message(
        settings: Settings, own_postgres: tuple[OwnPostgres, str], clock: FixedClock) -> None:
    """gRPC's UNAVAILABLE is the code for "a transient condition, retry": client retry
    policies and load balancers act on it, while INTERNAL means a bug ("the server log has the
    details"). A database that cannot be reached is the former; the message should say so."""
    server, url = own_postgres
    async with _pg_server(settings, url, clock) as (api, _):
        await reward_type(api)
        await promotion(api)
        server.stop()
        results = await _calls_during_outage(api)
        server.start()
    summary = {name: (error.code() if error else None, error.details() if error else None,
                      (error_info_of(error).reason if error and error_info_of(error) else None))
               for name, (error, _) in results.items()}
    for _name, (code, details, reason) in summary.items():
        assert code == grpc.StatusCode.UNAVAILABLE, summary
        assert details and ("database" in details.lower() or "postgres" in details.lower()), \
            summary
        assert reason and reason != "INTERNAL", summary


async def test_health_check_stays_serving_while_postgresql_is_down(
        settings: Settings, own_postgres: tuple[OwnPostgres, str], clock: FixedClock) -> None:
    """Documents the behaviour: grpc.health.v1 answers SERVING once the server listens and
    until it stops (docs/operations.md, "Starting, upgrading, stopping"); it does not probe
    PostgreSQL. The docs promise nothing else, and since every server shares the one database,
    a load balancer taking them all out would not help: so this is not flagged."""
    server, url = own_postgres
    async with _pg_server(settings, url, clock) as (api, _):
        health = health_pb2_grpc.HealthStub(api.channel)
        server.stop()
        during = await health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        named = await health.Check(health_pb2.HealthCheckRequest(
            service="promo.v1.RewardService"), timeout=5)
        server.start()
    assert during.status == named.status == health_pb2.HealthCheckResponse.SERVING


async def test_the_same_server_serves_again_after_postgresql_restarts(
        settings: Settings, own_postgres: tuple[OwnPostgres, str], clock: FixedClock) -> None:
    """The asyncpg pool reconnects: after a restart (calls failed meanwhile, or none did: the
    pool's idle connections all died unseen), the very first call answers, with no restart of
    the server process; the pool, warmed up to its maximum before, is usable again whole."""
    server, url = own_postgres
    async with _pg_server(settings, url, clock) as (api, db_pool):
        await reward_type(api)
        await promotion(api)
        # Warm every pool connection, so each one is a dead socket after the restart.
        await asyncio.gather(*(get_reward(api, f"warm-{i}") for i in range(30)))
        server.stop()
        await _calls_during_outage(api)
        server.start()
        first = await get_reward(api, "after-1", request_id="after-1")
        assert first.HasField("grant")
        created = await rtpb_grpc.RewardTypeServiceStub(api.channel).CreateRewardType(
            rtpb.CreateRewardTypeRequest(request_id="rt-after", reward_type=rtpb.RewardType(
                name="points", display_name="Points", category=1)),
            metadata=api.key(), timeout=10)
        assert created.reward_type.name == "points"

        # A restart nobody noticed (no call in between): the first call still answers.
        server.stop()
        server.start()
        again = await get_reward(api, "after-2", request_id="after-2")
        assert again.HasField("grant")
        many = await asyncio.gather(*(get_reward(api, f"many-{i}") for i in range(30)))
        assert all(r.HasField("grant") for r in many)
        assert await _count(db_pool, "SELECT count(*) FROM grants") == 30 + 1 + 1 + 30


def _postgres_family(server: OwnPostgres) -> list[int]:
    import psutil  # type: ignore[import-untyped]

    assert server.server.pid is not None
    leader = psutil.Process(server.server.pid)
    return [leader.pid, *(child.pid for child in leader.children(recursive=True))]


async def test_a_frozen_postgresql_costs_calls_their_deadline_and_no_more(
        settings: Settings, own_postgres: tuple[OwnPostgres, str], clock: FixedClock) -> None:
    """PostgreSQL hung (every postgres process SIGSTOPped: connections open, nothing answers):
    a call ends at the caller's deadline (DEADLINE_EXCEEDED), not later; once PostgreSQL
    answers again, the same server serves at once, with every pool connection usable (the
    cancelled calls' connections were not left stuck in the pool)."""
    server, url = own_postgres
    async with _pg_server(settings, url, clock) as (api, db_pool):
        await reward_type(api)
        await promotion(api)
        await asyncio.gather(*(get_reward(api, f"warm-{i}") for i in range(20)))
        family = _postgres_family(server)
        for pid in family:
            os.kill(pid, signal.SIGSTOP)
        try:
            stub = rpb_grpc.RewardServiceStub(api.channel)
            codes: list[grpc.StatusCode] = []
            began = time.monotonic()

            async def one(i: int) -> None:
                try:
                    await stub.GetReward(rpb.GetRewardRequest(
                        promotion_code="VIP25", customer_id=f"hung-{i}", request_id=f"h-{i}"),
                        metadata=api.key("runtime"), timeout=2)
                    codes.append(grpc.StatusCode.OK)
                except grpc.RpcError as exc:
                    codes.append(exc.code())

            await asyncio.gather(*(one(i) for i in range(12)))
            took = time.monotonic() - began
        finally:
            for pid in family:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
        assert codes == [grpc.StatusCode.DEADLINE_EXCEEDED] * 12, codes
        assert took < 3.5, took
        after = await asyncio.wait_for(asyncio.gather(
            *(get_reward(api, f"after-{i}") for i in range(30))), 15)
        assert all(r.HasField("grant") for r in after)
        retried = await get_reward(api, "hung-0", request_id="h-0")  # the unknown outcome
        assert retried.HasField("grant")
        assert await _count(db_pool, "SELECT count(*) FROM grants WHERE customer_id = 'hung-0'") \
            == 1
    # The cancelled calls leave futures whose "exception was never retrieved" (see the next
    # test) is logged when they are collected: collect them here, inside this test, rather
    # than at some later moment (CPython 3.11's traceback carets parse source with ``ast``,
    # and a collection inside another ``ast`` parse breaks it: gh-106905).
    gc.collect()


async def test_a_get_reward_cut_by_its_deadline_in_postgresql_logs_no_spurious_error(
        api: Api, pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture) -> None:
    """A database that does not answer in time (hung, or a lock held by another session) makes
    callers' deadlines fire mid-statement. The call ends DEADLINE_EXCEEDED and its one access
    line says `rpc cancelled`; nothing else should be logged at ERROR, least of all asyncio's
    'Future exception was never retrieved' with a traceback, which reads like a crash."""
    await reward_type(api)
    await promotion(api)
    async with pool.acquire() as blocker, blocker.transaction():
        await blocker.execute("LOCK TABLE grants IN EXCLUSIVE MODE")  # inserts wait
        with pytest.raises(grpc.RpcError) as err:
            await rpb_grpc.RewardServiceStub(api.channel).GetReward(rpb.GetRewardRequest(
                promotion_code="VIP25", customer_id="late", request_id="r-late"),
                metadata=api.key("runtime"), timeout=1)
        assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await asyncio.sleep(0.2)  # the server has seen the cancellation
    await asyncio.sleep(0.1)
    with caplog.at_level("ERROR", logger="asyncio"):
        gc.collect()
        await asyncio.sleep(0)
    never = [r for r in caplog.records if "never retrieved" in r.getMessage()]
    assert never == [], [r.getMessage() for r in never]


async def test_get_rewards_cut_by_a_postgresql_restart_are_retried_to_their_first_answer(
        settings: Settings, own_postgres: tuple[OwnPostgres, str], clock: FixedClock) -> None:
    """GetReward under load while PostgreSQL restarts: calls in flight fail (their outcome is
    unknown to the caller: the COMMIT may have happened). The same server, after the restart,
    answers each retry with the same request id with the first grant if there was one, and
    makes exactly one grant per request: the budget counter is the sum of the grants."""
    server, url = own_postgres
    customers = [f"load-{i:04d}" for i in range(300)]
    answered: dict[str, rpb.GetRewardResponse] = {}
    failed: dict[str, grpc.StatusCode] = {}
    async with _pg_server(settings, url, clock) as (api, db_pool):
        await reward_type(api)
        await promotion(api, caps=[cap(ppb.CAP_PERIOD_LIFETIME, "1000000")])
        stub = rpb_grpc.RewardServiceStub(api.channel)
        todo = list(reversed(customers))
        stopped = asyncio.Event()

        async def client() -> None:
            while todo:
                customer = todo.pop()
                try:
                    answered[customer] = await stub.GetReward(rpb.GetRewardRequest(
                        promotion_code="VIP25", customer_id=customer,
                        request_id=f"rid-{customer}"), metadata=api.key("runtime"), timeout=10)
                except grpc.RpcError as exc:
                    failed[customer] = exc.code()
                if stopped.is_set():
                    return

        async def enough() -> bool:
            return len(answered) >= 60

        clients = [asyncio.create_task(client()) for _ in range(24)]
        try:
            await _until(enough, within=30, what="60 answered calls")
            await asyncio.to_thread(server.stop)
            stopped.set()
            await asyncio.gather(*clients)
        finally:
            for task in clients:
                task.cancel()
        assert failed, "the restart found no call in flight"
        server.start()
        retried = {c: await stub.GetReward(rpb.GetRewardRequest(
            promotion_code="VIP25", customer_id=c, request_id=f"rid-{c}"),
            metadata=api.key("runtime"), timeout=10) for c in customers}
        rows = await db_pool.fetch("SELECT id, customer_id, request_id FROM grants")
        used = await db_pool.fetchval("SELECT used FROM cap_usage WHERE scope = 'cashback'")
    assert all(r.HasField("grant") for r in retried.values())
    for customer, first in answered.items():
        again = retried[customer]
        assert (again.grant.grant_id, again.existing) == (first.grant.grant_id, True), customer
    assert len(rows) == len(customers)
    assert {str(r["id"]): r["customer_id"] for r in rows} == {
        retried[c].grant.grant_id: c for c in customers}
    assert used == Decimal(15) * len(customers)


# === 4. PostgreSQL restarted under a running worker ==============================================


async def test_a_worker_rides_out_a_postgresql_restart_and_loses_nothing(
        settings: Settings, own_postgres: tuple[OwnPostgres, str]) -> None:
    """A real arq worker (build_worker, its sweeper every second, the real clock) on a
    PostgreSQL that restarts. It stays up through the outage (its sweeper logs and retries),
    and afterwards: a webhook emitted before the outage but never queued is delivered, one
    whose POST was in flight when the database went away (its result could not be recorded)
    is delivered (at least once, the same event id), one emitted after the restart is
    delivered once; every outbox job ends done."""
    server, url = own_postgres
    s = settings.model_copy(update={"database_url": url, "job_lease_seconds": 5})
    real = SystemClock()
    listener = await WebhookListener().start()
    db_pool = await create_pool(url, min_size=1, max_size=5)
    redis = await create_arq_pool(RedisSettings.from_dsn(s.redis_url or ""))
    worker = build_worker(s, clock=real, handle_signals=False, run_sweeper=True)
    task = asyncio.create_task(worker.async_run())
    try:
        await _add_listener(db_pool, listener.url, EventType.CAMPAIGN_EXECUTED, real.now())
        listener.answer("hang")
        flight_id, flight_job = await _emit(db_pool, {"campaign_id": "in-flight"}, real.now())
        await queue_after_commit(redis, job_id=flight_job, due_at=real.now(),
                                 queue_name=s.queue_name)
        await asyncio.wait_for(listener.hung.wait(), 20)
        # Emitted, never queued (a server died before queueing): only the sweeper can find it,
        # and it is not due before the outage.
        async with db_pool.acquire() as conn, conn.transaction():
            emitted = await webhook_repo.emit_event(
                conn, event_type=EventType.CAMPAIGN_EXECUTED, payload={"campaign_id": "unqueued"},
                now=real.now())
            assert emitted is not None
            await conn.execute("UPDATE outbox_jobs SET due_at = now() + interval '3 seconds'"
                               " WHERE id = ANY($1)", emitted.outbox_job_ids)
        unqueued_id = str(emitted.event_id)

        await asyncio.to_thread(server.stop)
        listener.release.set()  # the listener answers 200; recording it fails
        await asyncio.sleep(2.5)  # two sweeper ticks against a stopped database
        assert not task.done(), "the worker stopped during the PostgreSQL outage"
        await asyncio.to_thread(server.start)

        after_id, after_job = await _emit(db_pool, {"campaign_id": "after"}, real.now())
        await queue_after_commit(redis, job_id=after_job, due_at=real.now(),
                                 queue_name=s.queue_name)

        async def all_delivered() -> bool:
            return await _count(db_pool, "SELECT count(*) FROM webhook_deliveries"
                                         " WHERE status = 'DELIVERED'") == 3

        await _until(all_delivered, within=30, what="the three deliveries after the restart")

        async def jobs_done() -> bool:
            return await _count(db_pool, "SELECT count(*) FROM outbox_jobs"
                                         " WHERE status <> 'done'") == 0

        await _until(jobs_done, within=15, what="every outbox job to be done")
        assert not task.done()
    finally:
        await worker.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
        await redis.aclose()
        await db_pool.close()
        await listener.stop()
    ids = [r.event_id for r in listener.received]
    assert set(ids) == {flight_id, unqueued_id, after_id}
    assert ids.count(unqueued_id) == 1 and ids.count(after_id) == 1
    assert 1 <= ids.count(flight_id) <= 2
    assert all(r.verify_error is None for r in listener.received)
