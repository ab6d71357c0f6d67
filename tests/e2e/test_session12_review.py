"""Review of session 12's diff (26ef7c9..HEAD): each confirmed defect was a strict xfail that
asserted the correct behaviour, and passes since its fix; the checks that held are plain tests.

Confirmed defects, fixed (the payload read with a regex guard and promo_try_timestamptz,
migration 0029; 0028 locks the counters first and counts in a second statement; a failed
re-queue drops the lease; RedeliverEvent also asks the campaign):
- storage/retention.py: a dead ``bonus.batch`` whose payload the handler itself refused as bad
  ("bad bonus batch payload", PermanentJobError) makes the outbox purge's new keep-clause cast
  that payload (``::bigint`` / ``::timestamptz``) and fail: the whole hourly purge (outbox jobs,
  idempotency keys, bonus history) then fails every hour until someone deletes the row.
- storage/migrations/0028: the recount is one UPDATE ... FROM (count): a grant in flight while
  it runs (a rolling upgrade: servers keep granting) is re-checked by EvalPlanQual against the
  count of the statement's snapshot, so a drifted counter stays below the live customers (the
  invariant 0028 was written to restore). storage.promotions._recount_caps locks first and counts
  afterwards exactly to avoid this.
- workers/outbox.py _defer: the row is leased until retry + a whole lease *before* the re-queue;
  when the re-queue fails (Redis down), nothing is queued and the sweeper is kept off the row
  for ~305 s instead of taking it at the retry time.
- migration 0027 + rolling upgrade (docs/operations.md says old servers keep answering while the
  first new process migrates): a campaign cancelled by a server of the previous release after
  0027 ran is never withdrawn, and RedeliverEvent re-sends its clearance announcement.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import pwd
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import grpc
import pytest
from arq.connections import ArqRedis
from arq.worker import func
from redis.exceptions import ConnectionError as RedisConnectionError

from cli import embedded
from config.settings import Settings
from core import secret_box
from core.caps import LIFETIME_START
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import listeners_pb2 as lpb
from promo.v1 import listeners_pb2_grpc as lpb_grpc
from server import promotion_cache as cache_module
from server.errors import error_info_of
from storage import outbox, retention
from storage.migrate import APPLICATION_NAME, migrate_dsn
from storage.queue import queue_outbox_job
from tests.conftest import Api
from tests.e2e.test_bonus_races_audit import _manual_batch, batch_job, ctx
from tests.e2e.test_state_machine_audit import campaign_in
from tests.integration.test_upgrade_audit import (
    NOW,
    OLD_GRANT_17,
    add_old_promotion,
    add_reward_type,
    reward,
)
from workers import main as _main  # noqa: F401  (registers every outbox handler)
from workers.main import PromoWorker
from workers.outbox import run_outbox_job
from workers.retention import purge_retention

# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


async def _until(check: Callable[[], Awaitable[bool]], what: str, within: float = 10) -> None:
    deadline = time.monotonic() + within
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


# ---------------------------------------------------------------------------------------------
# 1. Retention: the outbox purge's keep-clause for dead bonus batches
# ---------------------------------------------------------------------------------------------


async def _old_done_job(conn: asyncpg.Connection, finished: Any) -> int:
    job = await outbox.add_job(conn, kind="webhook.deliver", payload={"delivery_id": 1},
                               due_at=finished)
    assert job is not None
    await outbox.finish_job(conn, job, now=finished)
    return job


async def test_a_dead_batch_with_a_bad_payload_does_not_stop_the_hourly_purge(
        pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """workers/bonuses.py kills a bonus.batch job whose payload does not parse
    (PermanentJobError "bad bonus batch payload"): that is a case the code expects. Eight days
    later the purge must still run: delete that job and the other finished ones, and go on
    with the later tables."""
    async with pool.acquire() as conn:
        bad = await outbox.add_job(conn, kind="bonus.batch", due_at=clock.now(), payload={
            "definition": "def-7", "window_start": clock.now().isoformat(),
            "window_end": clock.now().isoformat()})
        assert bad is not None
        done = await _old_done_job(conn, clock.now())
    worker = {"pool": pool, "clock": clock, "settings": settings, "redis": None}
    assert await run_outbox_job(worker, bad) == "dead"
    async with pool.acquire() as conn:
        assert "bad bonus batch payload" in await conn.fetchval(
            "SELECT last_error FROM outbox_jobs WHERE id = $1", bad)
    clock.advance(timedelta(days=60))
    counts = await purge_retention({"pool": pool, "settings": settings, "clock": clock})
    assert counts[retention.OUTBOX_JOBS] >= 1
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM outbox_jobs WHERE id = $1", done) == 0


async def test_dead_batches_with_pending_windows_are_kept_in_both_payload_forms(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    pk, window, due, _ = await _manual_batch(api, pool, clock, "keep", 2)
    job = await batch_job(pool, pk, window)
    payload = {"definition": pk, "window_start": window.isoformat(),
               "window_end": due.isoformat()}
    async with pool.acquire() as conn:
        await conn.execute(
            """UPDATE outbox_jobs SET status = 'dead', finished_at = $2, last_error = 'x'
                WHERE id = $1""", job, clock.now())
        # The same job once more, its payload a jsonb object (not a JSON string).
        obj = await conn.fetchval(
            """INSERT INTO outbox_jobs (kind, payload, status, finished_at, dedup_key)
               VALUES ('bonus.batch', $1::text::jsonb, 'dead', $2, 'rv12-obj') RETURNING id""",
            json.dumps(payload), clock.now())
        assert await conn.fetchval("SELECT jsonb_typeof(payload) FROM outbox_jobs "
                                   "WHERE id = $1", obj) == "object"
        assert await conn.fetchval("SELECT jsonb_typeof(payload) FROM outbox_jobs "
                                   "WHERE id = $1", job) == "string"
        nulled = await conn.fetchval(
            """INSERT INTO outbox_jobs (kind, payload, status, finished_at, dedup_key)
               VALUES ('bonus.batch', 'null'::jsonb, 'dead', $1, 'rv12-null') RETURNING id""",
            clock.now())
        other = await conn.fetchval(  # a window with nothing pending
            """INSERT INTO outbox_jobs (kind, payload, status, finished_at, dedup_key)
               VALUES ('bonus.batch', $1::text::jsonb, 'dead', $2, 'rv12-other') RETURNING id""",
            json.dumps({**payload, "window_start": (window - timedelta(days=1)).isoformat()}),
            clock.now())
        await retention.purge_outbox_jobs(conn, now=clock.now() + timedelta(days=30), days=7)
        left = {r["id"] for r in await conn.fetch("SELECT id FROM outbox_jobs")}
    assert {job, obj} <= left
    assert nulled not in left and other not in left


# ---------------------------------------------------------------------------------------------
# 2. Migration 0028 during a rolling upgrade
# ---------------------------------------------------------------------------------------------


async def test_0028_recount_is_right_with_a_grant_in_flight(
        database_at: Callable[[int], Awaitable[str]]) -> None:
    """At 0027, a promotion with a customer cap of 5 whose counter drifted to 0 (pre-0020
    revokes) while customer A holds a live grant. A server of the previous release grants B
    (promo_grant, 17 arguments, unchanged since 0012) and its transaction is still open when
    the first new process migrates; it commits within the migration's 1 s lock timeout. After
    0028 the counter must equal the customers holding a live grant (2)."""
    url = await database_at(27)
    cash = json.dumps([{"reward_type": "cash", "kind": "SINGLE", "value": "1"}])
    conn = await asyncpg.connect(url)
    try:
        await add_reward_type(conn, "cash")
        promotion = await add_old_promotion(conn, "RACE", rewards=[reward("cash", "SINGLE", "1")],
                                            customer_cap=5)
        row = await conn.fetchrow(OLD_GRANT_17, promotion, 1, "A", "", "r-A", cash, "RACE",
                                  NOW, 5, LIFETIME_START, [], [], [], [], [], False, "")
        assert row is not None and row["outcome"] == "GRANTED"
        await conn.execute("UPDATE cap_usage SET used = 0, grants = 0 "
                           "WHERE promotion_id = $1 AND scope = '#customers'", promotion)
    finally:
        await conn.close()

    grantor = await asyncpg.connect(url)
    probe = await asyncpg.connect(url)
    migrating: asyncio.Task[list[int]] | None = None
    try:
        tx = grantor.transaction()
        await tx.start()
        row = await grantor.fetchrow(OLD_GRANT_17, promotion, 1, "B", "", "r-B", cash, "RACE",
                                     NOW, 5, LIFETIME_START, [], [], [], [], [], False, "")
        assert row is not None and row["outcome"] == "GRANTED"
        migrating = asyncio.create_task(migrate_dsn(url))

        async def waiting() -> bool:
            return bool(await probe.fetchval(
                """SELECT count(*) > 0 FROM pg_stat_activity
                    WHERE application_name = $1 AND datname = current_database()
                      AND wait_event_type = 'Lock'""", APPLICATION_NAME))

        await _until(waiting, "0028 to wait for the grant's row lock")
        await tx.commit()
        assert (await asyncio.wait_for(migrating, 30))[0] == 28
        used = await probe.fetchval(
            "SELECT used FROM cap_usage WHERE promotion_id = $1 AND scope = '#customers'",
            promotion)
        live = await probe.fetchval(
            "SELECT count(*) FROM promotion_customers WHERE promotion_id = $1 "
            "AND live_grants > 0", promotion)
    finally:
        if migrating is not None and not migrating.done():
            migrating.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await migrating
        await grantor.close()
        await probe.close()
    assert live == 2
    assert used == live


async def test_0028_recounts_a_drifted_counter_when_nothing_is_in_flight(
        database_at: Callable[[int], Awaitable[str]]) -> None:
    """The same data without a grant in flight: 0028 sets the counter to the live customers,
    and leaves an uncapped promotion's row alone."""
    url = await database_at(27)
    cash = json.dumps([{"reward_type": "cash", "kind": "SINGLE", "value": "1"}])
    conn = await asyncpg.connect(url)
    try:
        await add_reward_type(conn, "cash")
        capped = await add_old_promotion(conn, "CAPPED", rewards=[reward("cash", "SINGLE", "1")],
                                         customer_cap=5)
        for c in ("A", "B"):
            await conn.fetchrow(OLD_GRANT_17, capped, 1, c, "", f"r-{c}", cash, "CAPPED",
                                NOW, 5, LIFETIME_START, [], [], [], [], [], False, "")
        await conn.execute("UPDATE cap_usage SET used = 0, grants = 0 WHERE promotion_id = $1",
                           capped)
        assert (await migrate_dsn(url))[0] == 28
        row = await conn.fetchrow(
            "SELECT used, grants FROM cap_usage WHERE promotion_id = $1", capped)
        assert (row["used"], row["grants"]) == (2, 2)
    finally:
        await conn.close()


# ---------------------------------------------------------------------------------------------
# 3. The bonus batch's deferral
# ---------------------------------------------------------------------------------------------


class _DownRedis:
    """What a worker's ArqRedis does while Redis is down: every command raises."""

    async def enqueue_job(self, *args: Any, **kw: Any) -> Any:
        raise RedisConnectionError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    async def exists(self, *args: Any) -> Any:  # pragma: no cover - not reached
        raise RedisConnectionError("down")

    async def delete(self, *args: Any) -> Any:  # pragma: no cover - not reached
        raise RedisConnectionError("down")


async def test_a_deferred_job_whose_requeue_fails_is_left_to_the_sweeper_at_its_retry_time(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    pk, window, due, _ = await _manual_batch(api, pool, clock, "defer-down", 3,
                                             approval_mode=pb.APPROVAL_MODE_AUTOMATIC)
    job = await batch_job(pool, pk, window)
    worker = dict(ctx(pool, FixedClock(due), settings), redis=_DownRedis())
    async with pool.acquire() as holder:  # an earlier window's batch holds the definition
        await holder.execute("SELECT pg_advisory_lock(7009, $1)", pk)
        try:
            with contextlib.suppress(RedisConnectionError):
                assert await run_outbox_job(worker, job) == "deferred"
        finally:
            await holder.execute("SELECT pg_advisory_unlock(7009, $1)", pk)
    retry_at = due + timedelta(seconds=5)
    row = await pool.fetchrow("SELECT status, attempts, due_at FROM outbox_jobs WHERE id = $1",
                              job)
    assert (row["status"], row["attempts"], row["due_at"]) == ("pending", 0, retry_at)
    # The next sweeper tick after the retry time: nothing is in Redis, so it must queue it.
    async with pool.acquire() as conn:
        claimed = await outbox.lease_due_jobs(
            conn, now=retry_at + timedelta(seconds=settings.sweeper_interval_seconds),
            lookahead=timedelta(seconds=2 * settings.sweeper_interval_seconds),
            lease=timedelta(seconds=settings.job_lease_seconds))
    assert job in [j.id for j in claimed]


async def test_deferral_gives_back_exactly_the_attempt_and_holds_no_lock(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Deferred three times in a row (an earlier window's batch keeps the definition), then
    run: the attempt count ends at 1, the row done, every request computed once, and no
    advisory lock is left on any pooled connection between the runs."""
    pk, window, due, _ = await _manual_batch(api, pool, clock, "defer-3", 4,
                                             approval_mode=pb.APPROVAL_MODE_AUTOMATIC)
    job = await batch_job(pool, pk, window)
    at = FixedClock(due)
    async with pool.acquire() as holder:
        await holder.execute("SELECT pg_advisory_lock(7009, $1)", pk)
        holder_pid = holder.get_server_pid()
        try:
            for _ in range(3):
                assert await run_outbox_job(ctx(pool, at, settings), job) == "deferred"
                assert await pool.fetchval(
                    "SELECT attempts FROM outbox_jobs WHERE id = $1", job) == 0
                assert await pool.fetchval(
                    """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND pid <> $1
                          AND database = (SELECT oid FROM pg_database
                                           WHERE datname = current_database())""",
                    holder_pid) == 0
                at.advance(timedelta(seconds=5))
        finally:
            await holder.execute("SELECT pg_advisory_unlock(7009, $1)", pk)
    assert await run_outbox_job(ctx(pool, at, settings), job) == "done"
    row = await pool.fetchrow("SELECT status, attempts FROM outbox_jobs WHERE id = $1", job)
    assert (row["status"], row["attempts"]) == ("done", 1)
    assert await pool.fetchval(
        "SELECT count(*) FROM bonus_requests WHERE definition_pk = $1 AND status = 'PENDING'",
        pk) == 0


# ---------------------------------------------------------------------------------------------
# 4. Migration 0027 and a rolling upgrade
# ---------------------------------------------------------------------------------------------

# storage/webhooks.py cancel_pending_deliveries at 26ef7c9: what CancelCampaign of a server of
# the previous release runs (it knows nothing of webhook_events.withdrawn).
_OLD_CANCEL_SQL = """WITH c AS (
               UPDATE webhook_deliveries d
                  SET status = 'CANCELLED', update_time = $2,
                      last_error = coalesce(d.last_error || ' / ', '') || $3
                 FROM webhook_events e
                WHERE e.dedup_key = $1 AND d.event_id = e.id AND d.status = 'PENDING'
               RETURNING 1)
           SELECT count(*) FROM c"""


async def test_an_announcement_cancelled_by_an_old_server_after_0027_is_not_redelivered(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    campaign = await campaign_in("AWAITING_CLEARANCE", api, pool, settings, clock)
    assert campaign.campaign_id == "spring"
    async with pool.acquire() as conn, conn.transaction():  # an old server's CancelCampaign
        pk = await conn.fetchval("SELECT id FROM campaigns WHERE campaign_id = 'spring' "
                                 "FOR UPDATE")
        await conn.execute("UPDATE campaigns SET status = 'CANCELLED', cancelled_at = $2 "
                           "WHERE id = $1", pk, clock.now())
        assert await conn.fetchval(_OLD_CANCEL_SQL, f"campaign:{pk}:clearance", clock.now(),
                                   "campaign cancelled") == 1
    delivery_id = await pool.fetchval(
        """SELECT d.id FROM webhook_deliveries d JOIN webhook_events e ON e.id = d.event_id
            WHERE e.dedup_key = $1""", f"campaign:{pk}:clearance")
    stub = lpb_grpc.ListenerServiceStub(api.channel)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await stub.RedeliverEvent(lpb.RedeliverEventRequest(
            request_id="rv12-redeliver", delivery_id=delivery_id), metadata=api.key())
    info = error_info_of(caught.value)
    assert info is not None and info.reason == "EVENT_WITHDRAWN"


# ---------------------------------------------------------------------------------------------
# 5. PromoWorker.close on a stalled Redis
# ---------------------------------------------------------------------------------------------


async def _noop(ctx: dict[str, Any]) -> None:  # pragma: no cover - never run
    return None


async def test_worker_close_on_a_redis_that_never_answers_is_bounded_and_runs_shutdown(
        queue_name: str) -> None:
    """A Redis that accepts connections and never answers (a frozen process): close() waits
    at most about 2 s for the health-check delete and 2 s for the pool's close, and
    on_shutdown runs."""
    held: list[asyncio.StreamWriter] = []

    async def silent(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    stopped: list[bool] = []

    async def on_shutdown(_: dict[str, Any]) -> None:
        stopped.append(True)

    redis = ArqRedis(host="127.0.0.1", port=port, default_queue_name=queue_name)
    worker = PromoWorker(functions=[func(_noop, name="noop")], redis_pool=redis,
                         queue_name=queue_name, handle_signals=False, on_shutdown=on_shutdown)
    try:
        began = time.monotonic()
        await asyncio.wait_for(worker.close(), 15)
        took = time.monotonic() - began
    finally:
        for w in held:
            w.close()
        server.close()
    assert stopped == [True]
    assert took < 5.5, took


class _FreezingProxy:
    """A TCP proxy to the test Redis that can be frozen: connections stay open, nothing is
    passed on (what SIGSTOP on redis-server does), without touching the real Redis."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self._thawed = asyncio.Event()
        self._thawed.set()
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _accept(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        sr, sw = await asyncio.open_connection(*self.target)
        self._writers += [cw, sw]
        for r, w in ((cr, sw), (sr, cw)):
            task = asyncio.ensure_future(self._pump(r, w))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(Exception):
            while data := await r.read(65536):
                await self._thawed.wait()
                w.write(data)
                await w.drain()

    def freeze(self) -> None:
        self._thawed.clear()

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for w in self._writers:
            w.close()
        if self._server is not None:
            self._server.close()


async def test_worker_close_with_a_job_stuck_in_a_frozen_redis_command_is_bounded(
        settings: Settings, queue_name: str) -> None:
    """Redis freezes after the worker connected, while one of its jobs is inside a Redis
    command (an outbox job queueing its retry: arq's WATCH/MULTI enqueue). close() cancels that
    job (redis-py drops the connection on cancel, no UNWATCH wait), waits ~2 s for the
    health-check delete, runs on_shutdown and returns."""
    assert settings.redis_url
    parts = urlsplit(settings.redis_url)
    proxy = _FreezingProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    port = await proxy.start()
    redis = ArqRedis(host="127.0.0.1", port=port, default_queue_name=queue_name)
    stopped: list[bool] = []

    async def on_shutdown(_: dict[str, Any]) -> None:
        stopped.append(True)

    worker = PromoWorker(functions=[func(_noop, name="noop")], redis_pool=redis,
                         queue_name=queue_name, handle_signals=False, on_shutdown=on_shutdown)
    try:
        assert await redis.ping()
        proxy.freeze()
        stuck = asyncio.ensure_future(queue_outbox_job(
            redis, job_id=1, attempts=0, due_at=datetime.now(UTC), queue_name=queue_name))
        worker.tasks["stuck"] = stuck
        await asyncio.sleep(0.2)
        assert not stuck.done()
        began = time.monotonic()
        await asyncio.wait_for(worker.close(), 15)
        took = time.monotonic() - began
    finally:
        await proxy.stop()
    assert stuck.cancelled()
    assert stopped == [True]
    assert took < 5.5, took


# ---------------------------------------------------------------------------------------------
# 6. The promotion cache's load locks under cancellation
# ---------------------------------------------------------------------------------------------


async def test_cancelled_loads_leave_no_load_lock_and_waiters_still_load(
        pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = cache_module.PromotionCache(pool, ttl_seconds=60)
    gate = asyncio.Event()
    loads: list[str] = []

    async def slow_load(code: str) -> Any:
        loads.append(code)
        await gate.wait()
        entry = cache_module.CachedPromotion(None, {}, time.monotonic(), None)  # type: ignore[arg-type]
        cache._entries[code] = entry
        return entry

    monkeypatch.setattr(cache, "_load", slow_load)
    calls = [asyncio.ensure_future(cache.get("PROMO")) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert cache._locks["PROMO"][1] == 5 and loads == ["PROMO"]
    calls[0].cancel()  # the one loading
    calls[3].cancel()  # a waiter
    await asyncio.sleep(0.01)
    assert cache._locks["PROMO"][1] == 3
    gate.set()
    results = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[3], asyncio.CancelledError)
    assert len({id(r) for i, r in enumerate(results) if i not in (0, 3)}) == 1
    assert cache._locks == {}
    assert loads == ["PROMO", "PROMO"]  # the cancelled load's waiter loaded it again


async def test_unknown_codes_and_expired_entries_leave_nothing_behind(
        pool: asyncpg.Pool) -> None:
    cache = cache_module.PromotionCache(pool, ttl_seconds=0.05)
    for n in range(20):
        with pytest.raises(Exception):  # noqa: B017 - NOT_FOUND, whatever its class
            await cache.get(f"NOPE-{n}")
    assert cache._locks == {} and cache._entries == {}


# ---------------------------------------------------------------------------------------------
# 7. The embedded PostgreSQL's exec trampoline
# ---------------------------------------------------------------------------------------------

_PROBE = ("id -u; id -g; id -G | tr ' ' '\\n' | sort -n | tr '\\n' ' '; echo; "
          "grep -E '^Sig(Ign|Blk)' /proc/self/status; echo \"HOME=$HOME USER=$USER\"; "
          "echo \"argv=$0|$1\"; exit 7")


def _root_and_user() -> str:
    name = os.environ.get("PROMO_EMBEDDED_PG_USER", "")
    if os.geteuid() != 0 or not name:
        pytest.skip("needs root and PROMO_EMBEDDED_PG_USER")
    try:
        pwd.getpwnam(name)
    except KeyError:
        pytest.skip(f"no user {name}")
    return name


def test_the_trampoline_switches_users_as_subprocess_did(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same program run through the trampoline and through subprocess's user=/group=/
    extra_groups= (the old path): same uid, gid, groups, ignored and blocked signals, env,
    argv (with a quote and a space) and exit code."""
    name = _root_and_user()
    pg = embedded.EmbeddedPostgres(tmp_path, run_as_user=name)
    pg.pgdata.mkdir(parents=True)
    ident = pg._resolve_identity()
    assert ident.switch
    args = ["/bin/sh", "-c", _PROBE, "it's a b", "second arg"]
    via_trampoline = pg._run(args, ident, timeout=20)
    monkeypatch.setattr(sys, "executable", "")
    via_subprocess = pg._run(args, ident, timeout=20)
    assert via_trampoline == via_subprocess
    rc, out = via_trampoline
    assert rc == 7
    lines = out.splitlines()
    assert lines[0] == str(ident.uid) and lines[1] == str(ident.gid)
    assert f"USER={name}" in out and f"HOME={pg.pgdata}" in out
    assert "argv=it's a b|second arg" in out


def test_the_trampoline_reports_a_missing_program_and_signals_as_exit_codes(
        tmp_path: Path) -> None:
    name = _root_and_user()
    pg = embedded.EmbeddedPostgres(tmp_path, run_as_user=name)
    pg.pgdata.mkdir(parents=True)
    ident = pg._resolve_identity()
    rc, out = pg._run([str(tmp_path / "no-such-program")], ident, timeout=20)
    assert rc == 127 and "cannot run" in out
    rc, _ = pg._run(["/bin/sh", "-c", "kill -TERM $$"], ident, timeout=20)
    assert rc == -15
    began = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        pg._run(["/bin/sleep", "30"], ident, timeout=1)
    assert time.monotonic() - began < 10


# ---------------------------------------------------------------------------------------------
# 8. The secret box's sealed-value marker
# ---------------------------------------------------------------------------------------------


def test_only_enc_v_n_marks_a_sealed_value() -> None:
    key = bytes(range(32))
    box = secret_box.SecretBox([key])
    sealed = box.seal("s3cret", purpose=b"listener")
    assert secret_box.is_sealed(sealed) and box.open(sealed, purpose=b"listener") == "s3cret"
    for clear in ("enc:legacy-clear", "enc:", "enc:v:", "enc:vx:1", "ENC:v1:x", "enc:v1"):
        assert not secret_box.is_sealed(clear)
        assert box.open(clear, purpose=b"listener") == clear
        assert secret_box.SecretBox([]).open(clear, purpose=b"listener") == clear
        assert box.reseal(clear, purpose=b"listener") != clear  # sealed by the re-seal pass
    with pytest.raises(secret_box.MalformedSecretError):
        box.open("enc:v2:" + "a" * 16 + ":xyz", purpose=b"listener")
    with pytest.raises(secret_box.MalformedSecretError):
        box.open("enc:v1:garbage", purpose=b"listener")
