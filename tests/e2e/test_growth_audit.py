"""Growth audit: what a service that runs for months keeps, in PostgreSQL and in memory.

Tables: normal use end to end (grants, code pools and their alerts, a conditional campaign,
webhook deliveries, dynamic bonuses, request ids), then the hourly purge two months later must
leave no bookkeeping row (docs/operations.md, "Retention"), only the business records the docs
say are kept. In-process state (server/, workers/, storage/, core/): every dict, cache and set
of tasks that could grow with the number of distinct customers, promotions, codes, listeners or
callers, exercised through the real entry points. PostgreSQL sessions: prepared statements,
advisory locks and temporary tables per pooled connection.

Found and fixed (each test was a strict xfail before its fix): the promotion cache kept a load
lock for every code ever asked for (unknown ones too) and every promotion ever loaded; the
webhook client kept idle connections to listeners it no longer posted to (CLOSE_WAIT sockets
for the worker's life); the outbox purge deleted a dead bonus batch whose window still had
pending requests, and the sweeper then started the failing batch again on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import grpc
import psutil
import pytest
import redis as redis_sync

from config.settings import Settings
from core.clock import FixedClock
from core.events import EventType
from promo.v1 import bonuses_pb2 as bpb
from promo.v1 import bonuses_pb2_grpc as bpb_grpc
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import formulas_pb2_grpc as fpb_grpc
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from promo.v1 import promotions_pb2 as ppb
from promo.v1 import reward_types_pb2 as rtpb
from promo.v1 import reward_types_pb2_grpc as rtpb_grpc
from promo.v1 import rewards_pb2 as rpb
from promo.v1 import rewards_pb2_grpc as rpb_grpc
from server import grant_batcher as grant_batcher_module
from server import promotion_cache as promotion_cache_module
from server import rewards as rewards_module
from server.metrics import RPC_METRICS
from storage import bonuses as bonus_repo
from storage import retention
from storage.db import create_pool
from storage.retention import RetentionPolicy
from tests.conftest import Api, serving_api
from tests.e2e.campaign_helpers import create_campaign, set_statuses
from tests.e2e.code_helpers import code_promotion, codes_file, upload
from tests.e2e.live_server import live_server
from tests.e2e.promo_helpers import cap, get_reward, promotion, revoke, reward_type
from tests.e2e.test_bonuses_api import create as create_bonus_definition
from tests.e2e.test_bonuses_api import customers as upsert_customers
from tests.e2e.test_bonuses_api import definition as bonus_definition
from tests.e2e.test_bonuses_api import events as record_events
from tests.e2e.test_bonuses_api import request as request_bonus
from tests.e2e.test_bonuses_api import results as bonus_results
from tests.webhook_listener import SECRET, WebhookListener
from workers import main as _main  # noqa: F401  (registers every outbox handler)
from workers import webhooks
from workers.outbox import run_outbox_job
from workers.registry import SWEEP_HOOKS, PermanentJobError
from workers.retention import purge_retention

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def server_with_state(settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
                            monkeypatch: pytest.MonkeyPatch
                            ) -> AsyncIterator[tuple[Api, dict[str, Any]]]:
    """A real server whose RewardService's promotion cache and grant batcher are recorded, so
    a test can look at what they hold after real gRPC calls."""
    seen: dict[str, Any] = {}

    class RecordedCache(promotion_cache_module.PromotionCache):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            seen["cache"] = self

    class RecordedBatcher(grant_batcher_module.GrantBatcher):
        def __init__(self, *args: Any, **kw: Any) -> None:
            super().__init__(*args, **kw)
            seen["batcher"] = self

    monkeypatch.setattr(rewards_module, "PromotionCache", RecordedCache)
    monkeypatch.setattr(rewards_module, "GrantBatcher", RecordedBatcher)
    async with serving_api(settings, pool, clock) as api:
        yield api, seen


async def in_groups(call: Callable[[int], Awaitable[Any]], count: int,
                    size: int = 100) -> list[Any]:
    """``call(n)`` for n in range(count), ``size`` calls in flight at a time."""
    out: list[Any] = []
    for start in range(0, count, size):
        out += await asyncio.gather(*[call(n) for n in range(start, min(count, start + size))],
                                    return_exceptions=True)
    return out


# ---------------------------------------------------------------------------------------------
# In-process state of the gRPC server
# ---------------------------------------------------------------------------------------------


async def test_promotion_cache_stays_bounded_under_unknown_codes(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with server_with_state(settings, pool, clock, monkeypatch) as (api, seen):
        stub = rpb_grpc.RewardServiceStub(api.channel)

        def call(n: int) -> Any:  # a caller with a stale or mistyped code, 2,000 times
            return stub.GetReward(rpb.GetRewardRequest(
                promotion_code=f"NOPE-{n}", customer_id="c1", request_id=f"r-{n}"),
                metadata=api.key("runtime"))

        answers = await in_groups(call, 2000)
        assert all(isinstance(a, grpc.RpcError) and a.code() == grpc.StatusCode.NOT_FOUND
                   for a in answers)
        cache = seen["cache"]
        assert len(cache._entries) == 0  # nothing cached for an unknown code
        # The per-code load locks must not outlive the loads: at most the codes being loaded.
        assert len(cache._locks) <= 100, len(cache._locks)


async def test_promotion_cache_drops_promotions_not_used_within_its_ttl(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with server_with_state(settings, pool, clock, monkeypatch) as (api, seen):
        await reward_type(api)
        codes = [f"DAY{n:02d}" for n in range(40)]  # a promotion a day, used and retired
        for code in codes:
            await promotion(api, code)
            assert (await get_reward(api, "c1", code)).HasField("grant")
        cache = seen["cache"]
        assert set(cache._entries) == set(codes)
        await asyncio.sleep(cache._ttl + 0.2)
        assert (await get_reward(api, "c2", codes[-1])).HasField("grant")
        # Only what was used within the TTL is still held.
        assert set(cache._entries) <= {codes[-1]}, len(cache._entries)
        assert len(cache._locks) <= 1, len(cache._locks)


async def test_grant_batcher_forgets_each_promotion_after_its_grants(
        settings: Settings, pool: asyncpg.Pool, clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    async with server_with_state(settings, pool, clock, monkeypatch) as (api, seen):
        await reward_type(api)
        codes = [f"P{n:03d}" for n in range(30)]
        for code in codes:
            await promotion(api, code)
        stub = rpb_grpc.RewardServiceStub(api.channel)

        def call(n: int) -> Any:  # 20 customers per promotion, 200 calls in flight
            code = codes[n % len(codes)]
            return stub.GetReward(rpb.GetRewardRequest(
                promotion_code=code, customer_id=f"c{n}", request_id=f"{code}-{n}"),
                metadata=api.key("runtime"))

        answers = await in_groups(call, 20 * len(codes), 200)
        assert all(a.HasField("grant") for a in answers)
        batcher = seen["batcher"]
        assert batcher._queues == {}
        assert batcher._tasks == set()
        # Every promotion asked for is cached (at most one entry per promotion that exists).
        assert set(seen["cache"]._entries) == set(codes)


async def test_rpc_metric_children_do_not_grow_with_unknown_methods_or_callers(
        api: Api) -> None:
    before = dict(RPC_METRICS._children)
    for n in range(200):
        call = api.channel.unary_unary(f"/promo.v1.NoSuchService{n}/Nope{n}")
        with pytest.raises(grpc.RpcError) as err:
            await call(b"", metadata=api.key())
        assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    stub = rpb_grpc.RewardServiceStub(api.channel)
    for n in range(200):
        with pytest.raises(grpc.RpcError):
            await stub.GetReward(rpb.GetRewardRequest(
                promotion_code="X", customer_id="c", request_id="r"),
                metadata=(("x-api-key", f"wrong-key-{n}-0123456789"),))
    added = set(RPC_METRICS._children) - set(before)
    assert all(method.startswith("/promo.v1.RewardService/") for method, _ in added)
    assert len(added) <= 1


# ---------------------------------------------------------------------------------------------
# In-process state of the worker's webhook client
# ---------------------------------------------------------------------------------------------


class TinyHttp:
    """An HTTP/1.1 server on loopback answering every POST with 204, keep-alive."""

    def __init__(self) -> None:
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()
        self.requests = 0

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.sockets[0].getsockname()[1])

    async def start(self) -> TinyHttp:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                self.requests += 1
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def close_idle(self) -> None:
        """What a real server does with a kept-alive connection left idle: close it."""
        for writer in list(self.writers):
            writer.close()
        await asyncio.sleep(0.05)

    async def stop(self) -> None:
        await self.close_idle()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def client_sockets_to(port: int) -> list[Any]:
    """This process's TCP sockets whose remote end is ``port`` (client side only)."""
    return [c for c in psutil.Process().net_connections(kind="tcp")
            if c.raddr and c.raddr.port == port]


@contextlib.asynccontextmanager
async def webhook_client(settings: Settings) -> AsyncIterator[webhooks.Http11Client]:
    ctx: dict[str, Any] = {"settings": settings}
    client = await webhooks.setup(ctx)
    assert isinstance(client, webhooks.Http11Client)
    try:
        yield client
    finally:
        await webhooks.teardown(ctx)


async def test_idle_webhook_connections_to_an_origin_no_longer_used_are_closed(
        settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(webhooks, "KEEPALIVE_SECONDS", 0.2)
    old, new = await TinyHttp().start(), await TinyHttp().start()
    try:
        async with webhook_client(settings) as client:
            # A burst to the old listener leaves several kept-alive connections.
            sent = await asyncio.gather(*[client.post(
                f"http://127.0.0.1:{old.port}/hook", b"{}", {}, 5) for _ in range(4)])
            assert all(s[0] == 204 for s in sent)
            assert len(client_sockets_to(old.port)) == 4
            await old.close_idle()  # the listener hangs up on idle connections, as servers do
            await asyncio.sleep(0.3)  # past the keep-alive time
            # The worker carries on with the other listener only.
            for _ in range(5):
                status, _, _ = await client.post(f"http://127.0.0.1:{new.port}/hook", b"{}",
                                                 {}, 5)
                assert status == 204
                await asyncio.sleep(0.25)
            assert client_sockets_to(old.port) == []
            assert all(origin[2] != old.port for origin in client._idle)
    finally:
        await old.stop()
        await new.stop()


async def test_webhook_url_cache_is_capped(settings: Settings) -> None:
    server = await TinyHttp().start()
    try:
        async with webhook_client(settings) as client:
            for n in range(10_050):
                status, _, _ = await client.post(
                    f"http://127.0.0.1:{server.port}/hook?listener={n}", b"{}", {}, 5)
                assert status == 204
            assert len(client._targets) <= 10_001
            assert sum(len(v) for v in client._idle.values()) <= settings.webhook_concurrency
    finally:
        await server.stop()


def test_send_slots_forget_each_listener_when_its_sends_end() -> None:
    from workers.send_slots import SendSlots

    async def run() -> dict[Any, int]:
        slots = SendSlots(32)

        async def send(listener: str) -> None:
            await slots.acquire(listener)
            await asyncio.sleep(0)
            slots.release(listener)

        await asyncio.gather(*[send(f"host-{n}") for n in range(2000)])
        assert slots.in_flight == 0 and not slots._waiters
        return slots._held

    assert asyncio.run(run()) == {}


# ---------------------------------------------------------------------------------------------
# Tables: months of normal use, then the hourly purge
# ---------------------------------------------------------------------------------------------

# What docs/operations.md ("Retention") says the purge deletes once old: bookkeeping.
BOOKKEEPING = ("idempotency_keys", "outbox_jobs", "webhook_events", "webhook_deliveries",
               "webhook_attempts", "code_pool_alerts", "bonus_results", "bonus_requests",
               "bonus_batches")


async def table_counts(conn: asyncpg.Connection) -> dict[str, int]:
    tables = [r["relname"] for r in await conn.fetch(
        """SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
            WHERE n.nspname = 'public' AND c.relkind = 'r' ORDER BY 1""")]
    return {t: await conn.fetchval(f'SELECT count(*) FROM "{t}"') for t in tables}


async def run_due_jobs(ctx: dict[str, Any], pool: asyncpg.Pool, clock: FixedClock) -> int:
    """What the workers do on the pinned clock: the sweep hooks (code-pool alerts, schedules),
    then every due outbox job through the real runner, until none is left."""
    ran = 0
    for _ in range(20):
        for hook in SWEEP_HOOKS:
            await hook(ctx)
        async with pool.acquire() as conn:
            due = [r["id"] for r in await conn.fetch(
                """SELECT id FROM outbox_jobs WHERE status = 'pending' AND due_at <= $1
                    ORDER BY id""", clock.now())]
        if not due:
            return ran
        for job_id in due:
            await run_outbox_job(ctx, job_id)
            ran += 1
    raise AssertionError("outbox jobs kept coming")


async def register_listener(api: Api, url: str, event_type: EventType) -> None:
    await lpb_grpc.ListenerServiceStub(api.channel).RegisterListener(lpb.RegisterListenerRequest(
        request_id=f"listener-{int(event_type)}", listener=lpb.Listener(
            event_type=int(event_type), url=url, secret=SECRET)),  # type: ignore[arg-type]
        metadata=api.key())


async def months_of_use(api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
                        listener: WebhookListener) -> dict[str, Any]:
    """Every feature once, as a deployment uses them, every job run to its end."""
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    await webhooks.setup(ctx)
    try:
        for event_type in EventType:
            await register_listener(api, listener.url, event_type)
        # Grants, a retry, a revoke.
        await reward_type(api)
        await promotion(api, "VIP25", caps=[cap(ppb.CAP_PERIOD_DAILY, "1000")])
        grants = [await get_reward(api, f"cust-{n}", request_id=f"gr-{n}") for n in range(10)]
        await get_reward(api, "cust-0", request_id="gr-0")
        await revoke(api, grants[0].grant.grant_id)
        # A personalized pool that runs dry: threshold, depleted and fallback alerts.
        await code_promotion(api, "FLASH", fallback="FALLBACK10", alerts=[
            ppb.CodeAlertThreshold(remaining_codes=2)])
        await upload(api, "FLASH", codes_file("FL", 4), "upload-1")
        for n in range(6):
            await get_reward(api, f"cust-{n}", "FLASH", external_values={"percent_off": "10"})
        # A conditional campaign: announced, cleared, executed.
        execute_at = clock.now() + timedelta(hours=2)
        await create_campaign(api, "weekend", execute_at, customers=["cust-1", "cust-2"])
        clock.advance(timedelta(minutes=91))
        await run_due_jobs(ctx, pool, clock)
        await set_statuses(api, "weekend", {"cust-1": True, "cust-2": False}, "clear-1")
        clock.advance(timedelta(minutes=30))
        await run_due_jobs(ctx, pool, clock)
        # Dynamic bonuses: automatic and manual, approved, rejected, skipped.
        await upsert_customers(api, ("b1", "EUR", "UTC"), ("b2", "EUR", "UTC"),
                               ("b3", "EUR", "UTC"))
        await record_events(api, "ev-1", *[
            (c, "deposit", amount, clock.now() - timedelta(hours=1), {})
            for c, amount in (("b1", "100"), ("b2", "40"))])
        await create_bonus_definition(api, bonus_definition(
            "auto", "last(deposit.amount) * 10%", batch_window_seconds=60))
        await create_bonus_definition(api, bonus_definition(
            "manual", "last(deposit.amount) * 50%", batch_window_seconds=60,
            approval_mode=bpb.APPROVAL_MODE_MANUAL))
        await request_bonus(api, "auto", ["b1", "b2", "b3"], "breq-1")
        await request_bonus(api, "manual", ["b1", "b2", "b3"], "breq-2")
        clock.advance(timedelta(minutes=2))
        await run_due_jobs(ctx, pool, clock)
        queue = await bonus_results(api, definition_id="manual",
                                    statuses=[bpb.BONUS_STATUS_CALCULATED])
        assert len(queue) == 2
        bonuses = bpb_grpc.BonusServiceStub(api.channel)
        await bonuses.ApproveBonusResults(bpb.ApproveBonusResultsRequest(
            request_id="approve-1", bonus_ids=[queue[0].bonus_id]), metadata=api.key())
        await bonuses.RejectBonusResults(bpb.RejectBonusResultsRequest(
            request_id="reject-1", bonus_ids=[queue[1].bonus_id], reason="audit"),
            metadata=api.key())
        await run_due_jobs(ctx, pool, clock)
        assert all(r.verify_error is None for r in listener.received)
        assert {json.loads(r.body)["event_type"] for r in listener.received} == {
            int(t) for t in EventType}  # every kind of event went out
        async with pool.acquire() as conn:
            counts = await table_counts(conn)
            left = await conn.fetchval(
                "SELECT count(*) FROM outbox_jobs WHERE status = 'pending'")
            undelivered = await conn.fetchval(
                "SELECT count(*) FROM webhook_deliveries WHERE status <> 'DELIVERED'")
        assert (left, undelivered) == (0, 0)
        return counts
    finally:
        await webhooks.teardown(ctx)


async def test_months_of_use_leave_only_business_rows_after_the_purge(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        listener: WebhookListener) -> None:
    used = await months_of_use(api, pool, settings, clock, listener)
    for table in BOOKKEEPING:
        assert used[table] > 0, table  # every bookkeeping table was written
    # Two months later (past the database's own now() too: some columns default to it).
    later = max(clock.now(), datetime.now(UTC)) + timedelta(days=60)
    ctx = {"pool": pool, "settings": settings, "clock": FixedClock(later)}
    counts = await purge_retention(ctx)
    async with pool.acquire() as conn:
        after = await table_counts(conn)
    assert {t: after[t] for t in BOOKKEEPING} == dict.fromkeys(BOOKKEEPING, 0), counts
    # Business records stay, as documented: grants, ledgers, codes, cap counters, campaigns
    # and their targets, customers and their events.
    for table in ("grants", "bonus_ledger", "promo_codes", "cap_usage", "campaigns",
                  "campaign_targets", "customers", "events", "promotion_customers"):
        assert after[table] == used[table] > 0, table
    # A second run finds nothing.
    assert set((await purge_retention(ctx)).values()) == {0}


# ---------------------------------------------------------------------------------------------
# PostgreSQL sessions: prepared statements, advisory locks, temporary tables
# ---------------------------------------------------------------------------------------------

FUNCS = ("sum", "max", "min", "avg")


def formula_with(terms: int, shift: int) -> str:
    """A formula whose aggregate statement differs for every (terms, shift)."""
    return " + ".join(f"{FUNCS[(i + shift) % len(FUNCS)]}(kind{i}.amount)"
                      for i in range(terms))


async def test_prepared_statements_per_connection_stay_bounded(
        settings: Settings, clock: FixedClock) -> None:
    """Every dry run of a new formula prepares a new aggregate statement; on a long-lived pooled
    connection they must not pile up (asyncpg's statement cache holds 100; the batch path's
    explicitly prepared ones are closed once dropped)."""
    assert settings.database_url
    one = await create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        async with serving_api(settings, one, clock) as api:
            await upsert_customers(api, ("p1", "EUR", "UTC"))
            stub = fpb_grpc.FormulaServiceStub(api.channel)
            period = fpb.TransactionPeriod(time_back=fpb.TransactionPeriod.TimeBack(
                amount=1, unit=fpb.TIME_UNIT_DAYS))
            for terms in range(1, 41):
                for shift in range(len(FUNCS) if terms > 1 else 1):
                    reply = await stub.DryRunFormula(fpb.DryRunFormulaRequest(
                        source=formula_with(terms, shift), customer_id="p1", period=period),
                        metadata=api.key())
                    assert reply.outcome == fpb.DRY_RUN_OUTCOME_SKIPPED
            gc.collect()
            async with one.acquire() as conn:
                await conn.fetchval("SELECT 1")  # asyncpg closes dropped statements here
                prepared = await conn.fetchval("SELECT count(*) FROM pg_prepared_statements")
        assert prepared <= 110, prepared
    finally:
        await one.close()


async def session_state(pool: asyncpg.Pool) -> tuple[int, int]:
    """(advisory locks held in this database, temporary tables of all sessions)."""
    async with pool.acquire() as conn:
        locks = await conn.fetchval(
            """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                AND database = (SELECT oid FROM pg_database WHERE datname = current_database())""")
        temps = await conn.fetchval(
            "SELECT count(*) FROM pg_class WHERE relpersistence = 't' AND relkind = 'r'")
    return locks, temps


async def test_batches_and_event_uploads_leave_no_locks_and_few_temp_tables(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    await upsert_customers(api, *[(f"b{n}", "EUR", "UTC") for n in range(20)])
    await create_bonus_definition(api, bonus_definition(
        "auto", "last(deposit.amount) * 10%", batch_window_seconds=60))
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    for window in range(15):
        await record_events(api, f"ev-{window}", *[
            (f"b{n}", "deposit", "10", clock.now() - timedelta(minutes=1), {})
            for n in range(20)])
        await request_bonus(api, "auto", [f"b{n}" for n in range(20)], f"breq-{window}")
        clock.advance(timedelta(minutes=2))
        await run_due_jobs(ctx, pool, clock)
    async with pool.acquire() as conn:
        assert await conn.fetchval(
            "SELECT count(*) FROM bonus_requests WHERE status = 'PENDING'") == 0
        assert await conn.fetchval("SELECT count(*) FROM bonus_batches "
                                   "WHERE finish_time IS NULL") == 0
    locks, temps = await session_state(pool)
    assert locks == 0
    # At most one staging table per pooled connection (bonus_results_staging lives as long as
    # its connection; the events' staging table is dropped at commit).
    assert temps <= 10, temps


async def test_a_batch_cancelled_mid_query_leaves_no_advisory_lock(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """A batch job cancelled while its connection waits in PostgreSQL (arq's timeout, a
    worker stopping) must not leave its session advisory locks held on the pooled connection:
    the definition's next batch would be 'busy' for as long as that connection lives."""
    await upsert_customers(api, ("b1", "EUR", "UTC"))
    await create_bonus_definition(api, bonus_definition(
        "auto", "last(deposit.amount) * 10%", batch_window_seconds=60))
    await request_bonus(api, "auto", ["b1"], "breq-1")
    clock.advance(timedelta(minutes=2))
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    async with pool.acquire() as conn:
        [job_id] = [r["id"] for r in await conn.fetch(
            "SELECT id FROM outbox_jobs WHERE kind = 'bonus.batch'")]
    assert settings.database_url
    blocker = await asyncpg.connect(settings.database_url)
    try:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("LOCK TABLE events IN ACCESS EXCLUSIVE MODE")
        task = asyncio.create_task(run_outbox_job(ctx, job_id))
        for _ in range(100):  # until the batch holds its locks and waits on the events
            if (await session_state(pool))[0] >= 2:
                break
            await asyncio.sleep(0.05)
        assert (await session_state(pool))[0] >= 2
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        await transaction.rollback()
    finally:
        await blocker.close()
    for _ in range(40):
        if (await session_state(pool))[0] == 0:
            break
        await asyncio.sleep(0.05)
    assert (await session_state(pool))[0] == 0
    # The definition's batch runs at once afterwards.
    async with pool.acquire() as conn:
        definition_pk = await conn.fetchval("SELECT id FROM bonus_definitions")
        window = await conn.fetchval("SELECT window_start FROM bonus_batches")
    report = await bonus_repo.run_batch(pool, definition_pk, window, now=clock.now())
    assert report.requests == 1


# ---------------------------------------------------------------------------------------------
# Redis: only pointers, each with an expiry
# ---------------------------------------------------------------------------------------------


async def test_redis_keeps_no_key_forever_after_jobs_ran(
        settings: Settings, pool: asyncpg.Pool, services: Any) -> None:
    """Redis carries pointers to outbox rows: once the jobs have run, what arq left for the
    deployment's queue (job results, the health check) expires; nothing piles up per job."""
    fast = settings.model_copy(update={"clearance_lead_seconds": 1.0})
    listener = await WebhookListener().start()
    try:
        async with live_server(fast, pool) as live:
            await register_listener(live, listener.url, EventType.CAMPAIGN_EXECUTED)
            await reward_type(live)
            await promotion(live)
            execute_at = datetime.now(UTC) + timedelta(seconds=1)
            for n in range(3):
                await create_campaign(live, f"atl-{n}", execute_at, customers=["a", "b"],
                                      conditional=False)
            for _ in range(200):
                async with pool.acquire() as conn:
                    pending = await conn.fetchval(
                        "SELECT count(*) FROM outbox_jobs WHERE status = 'pending'")
                    ran = await conn.fetchval("SELECT count(*) FROM outbox_jobs")
                if ran >= 6 and pending == 0:
                    break
                await asyncio.sleep(0.05)
            assert (ran, pending) == (6, 0)  # 3 executions, 3 deliveries
    finally:
        await listener.stop()
    client = redis_sync.Redis.from_url(services.redis_url)
    try:
        keys = list(client.scan_iter(match=f"*{settings.queue_name}*", count=1000))
        assert keys
        forever = [k for k in keys if client.ttl(k) == -1
                   and not (k == settings.queue_name.encode() and client.zcard(k) == 0)]
        assert forever == []
    finally:
        client.close()


async def test_a_request_id_past_its_retention_runs_as_a_new_request(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """docs/operations.md: a mutating call retried with a request_id older than
    PROMO_IDEMPOTENCY_KEY_RETENTION_DAYS runs again as a new request."""
    stub = rtpb_grpc.RewardTypeServiceStub(api.channel)

    async def create(name: str) -> Any:
        return await stub.CreateRewardType(rtpb.CreateRewardTypeRequest(
            request_id="rt-1", reward_type=rtpb.RewardType(
                name=name, display_name=name, category=1)), metadata=api.key())

    await create("cashback")
    with pytest.raises(grpc.RpcError) as err:
        await create("free_spins")  # young: the id is taken
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    later = datetime.now(UTC) + timedelta(days=31)
    async with pool.acquire() as conn:
        counts = await retention.purge_all(conn, RetentionPolicy(), now=later)
    assert counts["idempotency_keys"] == 1
    assert (await create("free_spins")).reward_type.name == "free_spins"


def test_formula_memo_tables_are_capped() -> None:
    """core/formula/memory.py _VALUE_SETS (rule filters checked against recorded events) and
    storage/bonuses.py _DESCRIBED (each batch's aggregate descriptions) are keyed by object id:
    many distinct rule filters and formulas over a process's life must not pile up."""
    from core.formula import memory
    from core.formula.compiler import compile_formula
    from core.formula.model import Filter

    event = memory.EventRecord(event_id=1, kind="bet", amount=Decimal("5"), currency="EUR",
                               occurred_at=datetime(2026, 11, 22, tzinfo=UTC),
                               attributes={"game": "Slots"})
    for n in range(3000):
        flt = Filter("game", "in", ("Slots", f"Game {n}"))
        assert memory.filter_matches(flt, event)
    assert len(memory._VALUE_SETS) <= 1001
    for n in range(300):
        compiled = compile_formula(f"sum(bet.amount) * {n + 1}")
        assert len(bonus_repo._described(compiled)) == 1
    assert len(bonus_repo._DESCRIBED) <= 101


async def test_a_dead_batch_stays_dead_after_the_purge(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    await upsert_customers(api, ("b1", "EUR", "UTC"))
    await create_bonus_definition(api, bonus_definition(
        "auto", "last(deposit.amount) * 10%", batch_window_seconds=60))
    await request_bonus(api, "auto", ["b1"], "breq-1")
    clock.advance(timedelta(minutes=2))

    async def broken(*args: Any, **kw: Any) -> None:
        raise PermanentJobError("the batch hit a bug that needs a look")

    monkeypatch.setattr(bonus_repo, "run_batch", broken)
    ctx: dict[str, Any] = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    async with pool.acquire() as conn:
        job_id = await conn.fetchval("SELECT id FROM outbox_jobs WHERE kind = 'bonus.batch'")
    assert await run_outbox_job(ctx, job_id) == "dead"
    for hook in SWEEP_HOOKS:  # while the dead job is kept, nothing re-runs the window
        await hook(ctx)

    async def batch_jobs() -> list[str]:
        async with pool.acquire() as conn:
            return [r["status"] for r in await conn.fetch(
                "SELECT status FROM outbox_jobs WHERE kind = 'bonus.batch' ORDER BY id")]

    assert await batch_jobs() == ["dead"]
    clock.advance(timedelta(days=8))  # the hourly purge, past PROMO_OUTBOX_JOB_RETENTION_DAYS
    await purge_retention({"pool": pool, "settings": settings, "clock": clock})
    for hook in SWEEP_HOOKS:  # the next sweeper tick
        await hook(ctx)
    async with pool.acquire() as conn:
        assert await conn.fetchval(
            "SELECT count(*) FROM bonus_requests WHERE status = 'PENDING'") == 1
    assert "pending" not in await batch_jobs()
