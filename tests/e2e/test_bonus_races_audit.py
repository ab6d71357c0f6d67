"""Audit: dynamic-bonus batches racing everything else.

A batch (``storage.bonuses.run_batch``, run by the ``bonus.batch`` outbox job of
workers/bonuses.py) computes every pending request of one definition. These tests hold a batch
at a known point (a monkeypatched storage function waiting on an ``asyncio.Event``: after it read
its pending requests, between two result transactions, or inside one right after its ``FOR
SHARE`` check of the definition) and then let the rest of the system act: new requests
(RequestBonusCalculation on two servers, automation-rule firings from RecordEvents, a schedule
run), definition edits, recalculation, approvals, a second worker, the retention purge. Real
PostgreSQL, real servers, the worker's own entry points; the interleavings are forced, never
hoped for, and each wait polls with a deadline.

The documented rules checked (docs/bonuses.md):

- lines 50-62: each request is a row unique per (definition, key); a request that commits after
  the batch read the pending ones is computed by a later run (the job re-armed, or the sweeper's
  re-arm of "one that committed while its batch was finishing"): each exactly once.
- lines 64-84: one result per request, the request marked done in the transaction of its
  result, ledger entry and events; ledger unique per bonus, events deduplicated; the advisory
  lock keeps a second copy of the job from computing the same requests ("already running");
  each result transaction re-reads revision and approval mode ``FOR SHARE``: an edit committed
  while the batch computes makes it start again with the edited definition, an edit arriving
  while a chunk is written waits for that chunk's commit (a recalculation then covers it); "No
  result of a replaced formula is written after the edit, and none is issued automatically
  after the operator switched to manual approval".
- line 19: switching manual to automatic issues only results calculated afterwards.
- line 21 and lines 137-141: events carry ``message``, "the definition's template for that
  event, rendered".
- lines 86-87: ListBonusBatches shows each window's cost: requests, customers, events_read
  ("the events the formula's aggregates counted, summed over customers and aggregates").
- lines 117-128: approve / reject all or none, only CALCULATED results; recalculation computes
  SKIPPED and CALCULATED results again in place.
- lines 129-133: the 30-day retention purge deletes results (waiting ones too) and finished
  requests; the ledger stays (storage/retention.py: rows in use are skipped, SKIP LOCKED).

Definitions have no pause or deactivation of their own (docs/bonuses.md lines 8-23): "paused"
applies to rules and schedules, whose requests already made are computed regardless.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable
from datetime import UTC, datetime, timedelta
from decimal import ROUND_DOWN, ROUND_HALF_UP, Decimal
from typing import Any

import asyncpg
import grpc
import pytest
from arq.jobs import Job

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import customers_pb2 as cpb
from promo.v1 import customers_pb2_grpc as cpb_grpc
from promo.v1 import promotions_pb2 as ppb
from storage import bonuses as repo
from storage import outbox, retention
from storage.db import create_pool
from storage.queue import fresh_arming, outbox_job_id
from tests.conftest import Api, rpc_error_reason
from tests.e2e.campaign_helpers import ts
from tests.e2e.test_bonuses_api import create, definition, request, stub
from workers.bonuses import rearm_stranded_batches, run_due_schedules
from workers.outbox import run_outbox_job

SKIPPED_EVENT, CALCULATED_EVENT, ISSUED_EVENT = 110, 111, 112
DEADLINE = 30.0  # seconds any single wait may take before the test fails
T0 = datetime(2026, 11, 22, 10, 1, tzinfo=UTC)  # inside the window [10:00, 10:05)


# --- helpers ----------------------------------------------------------------------------------


@pytest.fixture
async def second_pool(settings: Settings) -> AsyncIterator[asyncpg.Pool]:
    """Another worker process's connection pool."""
    assert settings.database_url
    db_pool = await create_pool(settings.database_url, min_size=1, max_size=10)
    try:
        yield db_pool
    finally:
        await db_pool.close()


class Pause:
    """Holds the ``at``-th call of a wrapped storage function until ``release``."""

    def __init__(self, at: int = 1) -> None:
        self.at = at
        self.calls = 0
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def point(self) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.reached.set()
            await asyncio.wait_for(self.release.wait(), DEADLINE)

    async def wait(self, task: asyncio.Future[Any]) -> None:
        """Until the pause is reached (fails if ``task`` ends first)."""
        waiter = asyncio.ensure_future(self.reached.wait())
        done, _ = await asyncio.wait({waiter, task}, timeout=DEADLINE,
                                     return_when=asyncio.FIRST_COMPLETED)
        if waiter not in done:
            waiter.cancel()
            if task.done():
                task.result()
            raise AssertionError("the batch never reached the pause")


def pause_before_write(monkeypatch: pytest.MonkeyPatch, at: int) -> Pause:
    """Pause the ``at``-th result transaction of a batch before it checks the definition (no
    lock held: the chunks before it are committed)."""
    pause = Pause(at)
    original = repo._write_results

    async def wrapped(*args: Any, **kw: Any) -> Any:
        await pause.point()
        return await original(*args, **kw)

    monkeypatch.setattr(repo, "_write_results", wrapped)
    return pause


def pause_inside_write(monkeypatch: pytest.MonkeyPatch, at: int) -> Pause:
    """Pause the ``at``-th result transaction right after its FOR SHARE check of the
    definition (the chunk is being written: an edit must wait for it)."""
    pause = Pause(at)
    original = repo._check_definition

    async def wrapped(conn: asyncpg.Connection, row: repo.DefinitionRow) -> None:
        await original(conn, row)
        await pause.point()

    monkeypatch.setattr(repo, "_check_definition", wrapped)
    return pause


def pause_after_claim(monkeypatch: pytest.MonkeyPatch, at: int) -> Pause:
    """Pause the ``at``-th result transaction after it claimed its requests (marked DONE) and
    inserted their results, before its events: its request rows are locked, uncommitted."""
    pause = Pause(at)
    original = repo.emit_events

    async def wrapped(*args: Any, **kw: Any) -> Any:
        await pause.point()
        return await original(*args, **kw)

    monkeypatch.setattr(repo, "emit_events", wrapped)
    return pause


async def waits_on_lock(pool: asyncpg.Pool, query_part: str,
                        task: asyncio.Future[Any] | None = None) -> None:
    """Until a backend of this database running ``query_part`` waits on a lock."""
    deadline = asyncio.get_running_loop().time() + DEADLINE
    while asyncio.get_running_loop().time() < deadline:
        if task is not None and task.done():
            task.result()
            raise AssertionError(f"{query_part!r} finished instead of waiting")
        if await pool.fetchval(
                """SELECT count(*) FROM pg_stat_activity
                    WHERE datname = current_database() AND wait_event_type = 'Lock'
                      AND query LIKE '%' || $1 || '%'""", query_part):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no backend waits on a lock in {query_part!r}")


def ctx(pool: asyncpg.Pool, clock: FixedClock, settings: Settings) -> dict[str, Any]:
    """What a worker hands its jobs and sweep hooks (no Redis: queueing is best effort)."""
    return {"pool": pool, "clock": clock, "settings": settings}


async def upsert(api: Api, request_id: str, ids: list[str]) -> None:
    for k in range(0, len(ids), 5000):
        await cpb_grpc.CustomerServiceStub(api.channel).UpsertCustomers(
            cpb.UpsertCustomersRequest(request_id=f"{request_id}-{k}", customers=[
                cpb.Customer(customer_id=c, currency="EUR", time_zone="UTC")
                for c in ids[k:k + 5000]]), metadata=api.key())


async def record(api: Api, request_id: str,
                 rows: list[tuple[str, str, str, datetime]]) -> cpb.RecordEventsResponse:
    """(customer_id, kind, amount, occurred_at) rows, one RecordEvents call."""
    return await cpb_grpc.CustomerServiceStub(api.channel).RecordEvents(
        cpb.RecordEventsRequest(request_id=request_id, events=[
            cpb.Event(external_id=f"{request_id}-{i}", customer_id=c, kind=kind, amount=amount,
                      currency="EUR", occurred_at=ts(at))
            for i, (c, kind, amount, at) in enumerate(rows)]), metadata=api.key())


def deposit_of(i: int) -> Decimal:
    return Decimal(100 + i % 37) + Decimal("0.35")


async def seed(api: Api, clock: FixedClock, prefix: str, n: int, *,
               without_deposit_every: int = 0) -> list[str]:
    """``n`` customers ``<prefix>0000``...; customer i deposited deposit_of(i) an hour ago
    (except every ``without_deposit_every``-th one: skipped, NO_MATCHING_TRANSACTIONS)."""
    ids = [f"{prefix}{i:04d}" for i in range(n)]
    await upsert(api, f"customers-{prefix}", ids)
    at = clock.now() - timedelta(hours=1)
    rows = [(c, "deposit", str(deposit_of(i)), at) for i, c in enumerate(ids)
            if not without_deposit_every or i % without_deposit_every]
    for k in range(0, len(rows), 5000):
        await record(api, f"deposits-{prefix}-{k}", rows[k:k + 5000])
    return ids


async def definition_pk(pool: asyncpg.Pool, definition_id: str) -> int:
    pk = await pool.fetchval("SELECT id FROM bonus_definitions WHERE definition_id = $1",
                             definition_id)
    assert pk is not None
    return int(pk)


async def batch_job(pool: asyncpg.Pool, pk: int, window: datetime) -> int:
    job_id = await pool.fetchval("SELECT id FROM outbox_jobs WHERE dedup_key = $1",
                                 repo._batch_dedup_key(pk, window))
    assert job_id is not None
    return int(job_id)


async def run_due(pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> list[str]:
    """Every due bonus batch job, through the outbox runner, as a worker runs them."""
    ids = [r["id"] for r in await pool.fetch(
        """SELECT id FROM outbox_jobs WHERE kind = 'bonus.batch' AND status = 'pending'
              AND due_at <= $1 ORDER BY id""", clock.now())]
    return [await run_outbox_job(ctx(pool, clock, settings), job_id) for job_id in ids]


async def edit(api: Api, request_id: str, paths: list[str],
               **fields: Any) -> pb.UpdateBonusDefinitionResponse:
    return await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
        request_id=request_id, definition=pb.BonusDefinition(**fields),
        update_mask={"paths": paths}), metadata=api.key())


async def recalculate(api: Api, request_id: str,
                      definition_id: str) -> pb.RecalculateBonusResultsResponse:
    return await stub(api).RecalculateBonusResults(pb.RecalculateBonusResultsRequest(
        request_id=request_id, definition_id=definition_id), metadata=api.key())


async def approve(api: Api, request_id: str,
                  ids: list[str]) -> pb.ApproveBonusResultsResponse:
    return await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
        request_id=request_id, bonus_ids=ids), metadata=api.key())


async def result_rows(pool: asyncpg.Pool, definition_id: str) -> list[asyncpg.Record]:
    return list(await pool.fetch(
        """SELECT r.bonus_id::text AS bonus_id, r.request_pk, r.customer_id, r.status,
                  r.amount, r.definition_revision, r.calculation_count
             FROM bonus_results r JOIN bonus_definitions d ON d.id = r.definition_pk
            WHERE d.definition_id = $1 ORDER BY r.id""", definition_id))


async def bonus_events(pool: asyncpg.Pool) -> list[asyncpg.Record]:
    return list(await pool.fetch(
        """SELECT event_type, dedup_key, body::jsonb -> 'data' ->> 'bonus_id' AS bonus_id,
                  body::jsonb -> 'data' ->> 'message' AS message,
                  body::jsonb -> 'data' ->> 'amount' AS amount
             FROM webhook_events WHERE event_type IN (110, 111, 112) ORDER BY id"""))


async def assert_exactly_once(pool: asyncpg.Pool, definition_id: str,
                              requests: int) -> Counter[str]:
    """Every request of the definition DONE with exactly one result; one ledger row per ISSUED
    result (its amount), none otherwise; per result one Calculated (or Skipped) event per
    calculation and one Issued event if issued. Returns the results' statuses."""
    pk = await definition_pk(pool, definition_id)
    counts = await pool.fetchrow(
        """SELECT count(*) AS requests, count(*) FILTER (WHERE status = 'DONE') AS done
             FROM bonus_requests WHERE definition_pk = $1""", pk)
    assert (counts["requests"], counts["done"]) == (requests, requests)
    rows = await result_rows(pool, definition_id)
    assert len(rows) == requests
    assert len({r["request_pk"] for r in rows}) == requests
    ledger = Counter()
    amounts = {}
    for r in await pool.fetch(
            "SELECT bonus_id::text AS b, amount FROM bonus_ledger WHERE definition_id = $1",
            definition_id):
        ledger[r["b"]] += 1
        amounts[r["b"]] = r["amount"]
    issued = {r["bonus_id"]: r["amount"] for r in rows if r["status"] == "ISSUED"}
    assert ledger == Counter(issued.keys())
    assert amounts == issued
    ours = {r["bonus_id"] for r in rows}
    per: dict[str, Counter[int]] = {b: Counter() for b in ours}
    for e in await bonus_events(pool):
        if e["bonus_id"] in ours:
            per[e["bonus_id"]][e["event_type"]] += 1
    for r in rows:
        told = r["calculation_count"]
        expected: Counter[int] = Counter()
        if r["status"] == "SKIPPED":
            expected[SKIPPED_EVENT] = told
        else:
            expected[CALCULATED_EVENT] = told
        if r["status"] == "ISSUED":
            expected[ISSUED_EVENT] = 1
        if r["calculation_count"] == 1:
            assert per[r["bonus_id"]] == expected, (r["customer_id"], per[r["bonus_id"]])
        else:  # recalculated: a Skipped/Calculated event per calculation, either kind
            assert sum(per[r["bonus_id"]][k] for k in (SKIPPED_EVENT, CALCULATED_EVENT)) == told
            assert per[r["bonus_id"]][ISSUED_EVENT] == expected[ISSUED_EVENT]
    return Counter(r["status"] for r in rows)


def tenth(amount: Decimal, rate: str = "0.1", cap: Decimal | None = None,
          places: str = "0.01", rounding: str = ROUND_HALF_UP) -> Decimal:
    value = (amount * Decimal(rate)).quantize(Decimal(places), rounding=rounding)
    return min(value, cap) if cap is not None else value


async def pending(pool: asyncpg.Pool, pk: int) -> int:
    return int(await pool.fetchval(
        "SELECT count(*) FROM bonus_requests WHERE definition_pk = $1 AND status = 'PENDING'",
        pk))


async def gather_ok(*calls: Awaitable[Any]) -> list[Any]:
    replies = await asyncio.gather(*calls, return_exceptions=True)
    errors = [r for r in replies if isinstance(r, BaseException)]
    assert errors == []
    return list(replies)


def reason_of(e: BaseException) -> str:
    if isinstance(e, grpc.RpcError):
        return f"{e.code().name}:{rpc_error_reason(e)}"
    return repr(e)



# --- 1. requests arriving while a batch of their window runs ------------------------------------


async def test_2000_requests_rule_firings_and_a_schedule_run_arriving_during_a_5000_batch(
        api: Api, second_server: Api, pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """5,000 requests in the window [10:00, 10:05); its job runs on a worker whose clock is at
    10:05 and is held after it read its pending requests (at its first result transaction).
    Meanwhile, on two servers whose clock still reads 10:02:30 (a request's time is taken
    before its transaction), the same window gets 2,000 API requests (20 calls of 100, new
    request ids, customers who already have one), 30 rule firings (RecordEvents, one bet each,
    rule "every 1 bet") and a schedule run for 50 customers. The held batch computes exactly
    its 5,000; the 2,080 others stay pending, the job finishes, the sweeper re-arms the window
    (docs/bonuses.md lines 58-62) and the next run computes exactly them: 7,080 results, one per
    request, ledger and events exactly once, batch request counts summing to 7,080."""
    clock.set(T0)
    await create(api, definition("flow", "sum(deposit.amount) * 10%",
                                 rounding=ppb.ROUNDING_MODE_ROUND, decimals=2))
    ids = await seed(api, clock, "c", 5000, without_deposit_every=5)
    late = [f"n{i:03d}" for i in range(100)]
    await upsert(api, "late-customers", late)
    await stub(api).CreateBonusRule(pb.CreateBonusRuleRequest(
        request_id="rule-every-bet", rule=pb.BonusRule(
            rule_id="every-bet", definition_id="flow", event_kind="bet", every=1)),
        metadata=api.key())
    await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
        request_id="schedule-daily", schedule=pb.BonusSchedule(
            schedule_id="daily", definition_id="flow", customer_ids=late[50:],
            weekday=0, local_time="10:02", time_zone="UTC")), metadata=api.key())
    first = await request(api, "flow", ids, "first", role="admin")
    assert first.accepted_count == 5000
    window = first.window_start.ToDatetime(UTC)
    pk = await definition_pk(pool, "flow")
    job_id = await batch_job(pool, pk, window)
    worker_clock = FixedClock(first.due_time.ToDatetime(UTC))
    pause = pause_before_write(monkeypatch, at=1)
    batch = asyncio.ensure_future(run_outbox_job(ctx(pool, worker_clock, settings), job_id))
    await pause.wait(batch)

    clock.set(T0 + timedelta(seconds=90))
    apis = [api, second_server]
    bet_at = clock.now() - timedelta(minutes=1)
    answers = await gather_ok(
        *[request(apis[k % 2], "flow", ids[100 * k:100 * k + 100], f"again-{k}",
                  role="admin") for k in range(20)],
        *[record(apis[k % 2], f"bets-{k}", [(c, "bet", "5", bet_at) for c in
                                            late[10 * k:10 * k + 10]]) for k in range(3)],
        run_due_schedules(ctx(pool, clock, settings)))
    assert [a.accepted_count for a in answers[:20]] == [100] * 20
    assert all(a.window_start.ToDatetime(UTC) == window for a in answers[:20])
    assert await pending(pool, pk) == 5000 + 2080

    pause.release.set()
    assert await asyncio.wait_for(batch, DEADLINE) == "done"
    assert await pending(pool, pk) == 2080
    first_run = await pool.fetchrow("SELECT * FROM bonus_batches WHERE definition_pk = $1", pk)
    assert first_run["request_count"] == 5000
    assert await run_due(pool, settings, worker_clock) == []  # the job is done: nothing due
    await rearm_stranded_batches(ctx(pool, worker_clock, settings))
    assert await run_due(pool, settings, worker_clock) == ["done"]
    assert await pending(pool, pk) == 0
    statuses = await assert_exactly_once(pool, "flow", 7080)
    # c0000, c0005, ... have no deposit (1,000 + 400 of their second requests skip), nor have
    # the 80 late customers.
    assert statuses == {"ISSUED": 7080 - 1480, "SKIPPED": 1480}
    sources = Counter(r["source"] for r in await pool.fetch(
        "SELECT source FROM bonus_requests WHERE definition_pk = $1", pk))
    assert sources == {"api": 7000, "rule:every-bet": 30, "schedule:daily": 50}
    assert await pool.fetchval(
        "SELECT sum(request_count) FROM bonus_batches WHERE definition_pk = $1", pk) == 7080


# --- 2. definition edits while a batch runs -----------------------------------------------------


async def _manual_batch(api: Api, pool: asyncpg.Pool, clock: FixedClock, definition_id: str,
                        n: int, **kw: Any) -> tuple[int, datetime, datetime, list[str]]:
    """A definition (MANUAL unless said), ``n`` customers with a deposit, one request each in
    the window of T0; returns (definition pk, window start, due time, customer ids)."""
    clock.set(T0)
    fields: dict[str, Any] = dict(approval_mode=pb.APPROVAL_MODE_MANUAL,
                                  rounding=ppb.ROUNDING_MODE_ROUND, decimals=2)
    fields.update(kw)
    await create(api, definition(definition_id, "sum(deposit.amount) * 10%", **fields))
    ids = await seed(api, clock, f"{definition_id}-", n)
    accepted = await request(api, definition_id, ids, f"{definition_id}-r", role="admin")
    assert accepted.accepted_count == n
    return (await definition_pk(pool, definition_id), accepted.window_start.ToDatetime(UTC),
            accepted.due_time.ToDatetime(UTC), ids)


async def test_an_edit_waits_for_the_chunk_being_written_and_the_rest_uses_the_new_version(
        api: Api, second_server: Api, pool: asyncpg.Pool, clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """100 requests written 40 per transaction. The first transaction is held right after its
    FOR SHARE check; an edit of formula (10% -> 20%), cap (25) and rounding (down, 0 decimals)
    on another server waits for it (lines 79-84). Once released: exactly the 40 results of
    that chunk carry revision 1 and the old formula's amounts; the 60 others were computed
    again and carry revision 2 and the new amounts (nothing of the replaced formula written
    after the edit; each result says which revision it is). A recalculation then brings the 40
    to revision 2; every result, ledger and event exactly once."""
    monkeypatch.setattr(repo, "WRITE_CHUNK", 40)
    pk, window, due, ids = await _manual_batch(api, pool, clock, "edit", 100)
    pause = pause_inside_write(monkeypatch, at=1)
    # The second chunk waits until the edit has committed: otherwise, on a busy machine, its
    # FOR SHARE can come in between the first chunk's commit and the waiting edit's lock.
    second = pause_before_write(monkeypatch, at=2)
    batch = asyncio.ensure_future(repo.run_batch(pool, pk, window, now=due))
    await pause.wait(batch)
    edited = asyncio.ensure_future(edit(
        second_server, "edit-20", ["formula", "cap_amount", "rounding", "decimals"],
        definition_id="edit", formula="sum(deposit.amount) * 20%", cap_amount="25",
        rounding=ppb.ROUNDING_MODE_ROUND_DOWN, decimals=0))
    await waits_on_lock(pool, "bonus_definitions", edited)
    pause.release.set()
    assert (await asyncio.wait_for(edited, DEADLINE)).definition.revision == 2
    second.release.set()
    report = await asyncio.wait_for(batch, DEADLINE)
    assert report.requests == 100
    deposits = {c: deposit_of(i) for i, c in enumerate(ids)}

    def twenty(amount: Decimal) -> Decimal:
        return tenth(amount, "0.2", Decimal(25), "1", ROUND_DOWN)

    old = Counter()
    for r in await result_rows(pool, "edit"):
        if r["definition_revision"] == 1:
            old[1] += 1
            assert r["amount"] == tenth(deposits[r["customer_id"]])
        else:
            assert r["definition_revision"] == 2
            assert r["amount"] == twenty(deposits[r["customer_id"]])
    assert old == {1: 40}
    done = await recalculate(api, "recalc", "edit")
    assert done.recalculated_count == 100
    rows = await result_rows(pool, "edit")
    assert {r["definition_revision"] for r in rows} == {2}
    assert all(r["amount"] == twenty(deposits[r["customer_id"]])
               for r in rows)
    assert await assert_exactly_once(pool, "edit", 100) == {"CALCULATED": 100}


@pytest.mark.parametrize(("before", "after", "first_chunk", "rest"), [
    (pb.APPROVAL_MODE_AUTOMATIC, pb.APPROVAL_MODE_MANUAL, "ISSUED", "CALCULATED"),
    (pb.APPROVAL_MODE_MANUAL, pb.APPROVAL_MODE_AUTOMATIC, "CALCULATED", "ISSUED"),
])
async def test_switching_the_approval_mode_mid_batch_applies_from_the_next_chunk(
        api: Api, second_server: Api, pool: asyncpg.Pool, clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch, before: int, after: int, first_chunk: str,
        rest: str) -> None:
    """The approval mode switched while the first of three chunks is written (the edit waits
    for it): that chunk keeps the old mode; the others are decided under the new one. To
    manual: none issued automatically after the switch committed (line 84). To automatic:
    results calculated before stay in the queue, later ones are issued (line 19)."""
    monkeypatch.setattr(repo, "WRITE_CHUNK", 40)
    pk, window, due, _ = await _manual_batch(api, pool, clock, "mode", 100,
                                             approval_mode=before)
    pause = pause_inside_write(monkeypatch, at=1)
    second = pause_before_write(monkeypatch, at=2)  # until the edit committed (see above)
    batch = asyncio.ensure_future(repo.run_batch(pool, pk, window, now=due))
    await pause.wait(batch)
    edited = asyncio.ensure_future(edit(second_server, "switch", ["approval_mode"],
                                        definition_id="mode", approval_mode=after))
    await waits_on_lock(pool, "bonus_definitions", edited)
    pause.release.set()
    await asyncio.wait_for(edited, DEADLINE)
    second.release.set()
    await asyncio.wait_for(batch, DEADLINE)
    statuses = await assert_exactly_once(pool, "mode", 100)
    assert statuses == {first_chunk: 40, rest: 60}


async def test_events_written_after_a_message_edit_carry_the_new_message(
        api: Api, pool: asyncpg.Pool, clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Line 21 / 137-141: an event's ``message`` is the definition's template for that event,
    rendered. The batch is held between its first chunk (committed) and its second; the
    operator fixes ``issued_message``; the edit commits at once (no revision: messages do not
    change calculations, so the batch does not start again). The 60 results written after that
    commit are announced with the replaced message (storage/bonuses.py _check_definition
    compares revision and approval mode only; _prepare_results renders row.definition's
    templates read when the batch started)."""
    monkeypatch.setattr(repo, "WRITE_CHUNK", 40)
    pk, window, due, _ = await _manual_batch(
        api, pool, clock, "msg", 100, approval_mode=pb.APPROVAL_MODE_AUTOMATIC,
        issued_message="Bonsu {{event.bonus_amount}}")
    pause = pause_before_write(monkeypatch, at=2)
    batch = asyncio.ensure_future(repo.run_batch(pool, pk, window, now=due))
    await pause.wait(batch)
    fixed = await edit(api, "fix-typo", ["issued_message"], definition_id="msg",
                       issued_message="Bonus {{event.bonus_amount}}")
    assert fixed.definition.revision == 1
    pause.release.set()
    await asyncio.wait_for(batch, DEADLINE)
    assert await assert_exactly_once(pool, "msg", 100) == {"ISSUED": 100}
    messages = Counter(e["message"].split(" ")[0] for e in await bonus_events(pool)
                       if e["event_type"] == ISSUED_EVENT)
    assert messages == {"Bonsu": 40, "Bonus": 60}


async def test_a_recalculation_racing_a_restarted_batch_leaves_every_result_on_the_new_formula(
        api: Api, second_server: Api, pool: asyncpg.Pool, clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The batch is held between its first chunk (40 results, committed, revision 1) and its
    second. On another server the operator edits the formula (commits at once) and
    recalculates: the recalculation covers exactly the 40 committed results; the batch, let go,
    finds the new revision and computes the 60 others with it (lines 79-84, 124-128). Every
    result ends on revision 2 with the new amount; the 40 were told twice, the 60 once."""
    monkeypatch.setattr(repo, "WRITE_CHUNK", 40)
    pk, window, due, ids = await _manual_batch(api, pool, clock, "race", 100)
    pause = pause_before_write(monkeypatch, at=2)
    batch = asyncio.ensure_future(repo.run_batch(pool, pk, window, now=due))
    await pause.wait(batch)
    assert (await edit(second_server, "to-15", ["formula"], definition_id="race",
                       formula="sum(deposit.amount) * 15%")).definition.revision == 2
    done = await recalculate(second_server, "recalc-15", "race")
    assert (done.recalculated_count, done.calculated_count) == (40, 40)
    pause.release.set()
    report = await asyncio.wait_for(batch, DEADLINE)
    assert report.requests == 100
    deposits = {c: deposit_of(i) for i, c in enumerate(ids)}
    rows = await result_rows(pool, "race")
    assert {r["definition_revision"] for r in rows} == {2}
    assert all(r["amount"] == tenth(deposits[r["customer_id"]], "0.15") for r in rows)
    assert Counter(r["calculation_count"] for r in rows) == {2: 40, 1: 60}
    assert await assert_exactly_once(pool, "race", 100) == {"CALCULATED": 100}


# --- 3. operators deciding while a batch of the same definition writes ---------------------------


async def test_overlapping_approvals_on_two_servers_while_the_batch_holds_a_chunk(
        api: Api, second_server: Api, pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """100 CALCULATED results of a first window; the next window's batch (100 requests) is
    held inside its first result transaction (holding the definition FOR SHARE). Meanwhile two
    operators on two servers approve overlapping sets ([0, 60) and [40, 100) in one call each)
    and 20 single approvals of [60, 80) and 10 rejections of [90, 100) go out. None waits
    for the batch; each result is decided by exactly one successful call (a set is all or
    none: the loser of an overlap changes nothing), with one ledger row and one Issued event
    per issued result; then the batch finishes its own 100, untouched."""
    monkeypatch.setattr(repo, "WRITE_CHUNK", 40)
    pk, window, due, ids = await _manual_batch(api, pool, clock, "ops", 100)
    assert await repo.run_batch(pool, pk, window, now=due) is not None
    first = {r["customer_id"]: r["bonus_id"] for r in await result_rows(pool, "ops")}
    bonus = [first[c] for c in ids]
    clock.set(due + timedelta(seconds=30))
    second = await request(api, "ops", ids, "ops-second", role="admin")
    window2 = second.window_start.ToDatetime(UTC)
    pause = pause_inside_write(monkeypatch, at=1)
    batch = asyncio.ensure_future(repo.run_batch(pool, pk, window2,
                                                 now=second.due_time.ToDatetime(UTC)))
    await pause.wait(batch)
    apis = [api, second_server]
    meta: list[tuple[str, str, list[str]]] = [("approve", "opA", bonus[0:60]),
                                              ("approve", "opB", bonus[40:100])]
    meta += [("approve", f"one-{i}", [bonus[i]]) for i in range(60, 80)]
    meta += [("reject", f"no-{i}", [bonus[i]]) for i in range(90, 100)]

    async def decide(k: int, kind: str, request_id: str, chosen: list[str]) -> Any:
        a = apis[k % 2]
        if kind == "approve":
            return await approve(a, request_id, chosen)
        return await stub(a).RejectBonusResults(pb.RejectBonusResultsRequest(
            request_id=request_id, bonus_ids=chosen, reason="abuse"), metadata=a.key())

    replies = await asyncio.wait_for(asyncio.gather(
        *[decide(k, *m) for k, m in enumerate(meta)], return_exceptions=True), DEADLINE)
    assert not batch.done()  # the decisions did not wait for the batch
    assert {reason_of(r) for r in replies if isinstance(r, BaseException)} <= {
        "FAILED_PRECONDITION:BONUS_NOT_AWAITING_APPROVAL"}
    deciders: Counter[str] = Counter()
    final = {r["bonus_id"]: r["status"] for r in await result_rows(pool, "ops")}
    for (kind, _, chosen), reply in zip(meta, replies, strict=True):
        if isinstance(reply, BaseException):
            continue
        assert [r.bonus_id for r in reply.results] == chosen
        wanted = "ISSUED" if kind == "approve" else "REJECTED"
        assert {final[b] for b in chosen} == {wanted}
        deciders.update(chosen)
    decided = {b for b in bonus if final[b] != "CALCULATED"}
    assert deciders == Counter(decided)  # exactly one successful decision each
    assert len(decided) >= 60  # opA or opB won: 60 results at least
    pause.release.set()
    assert (await asyncio.wait_for(batch, DEADLINE)).requests == 100
    statuses = await assert_exactly_once(pool, "ops", 200)
    assert statuses["CALCULATED"] == 100 + (100 - len(decided))
    assert statuses["ISSUED"] + statuses["REJECTED"] == len(decided)


# --- 6. the batch's recorded cost -------------------------------------------------------------


async def _cost_setup(api: Api, clock: FixedClock, n: int) -> list[str]:
    """Customers with one deposit each and, every third one, two bets (an hour ago), and a
    definition reading both kinds."""
    clock.set(T0)
    await create(api, definition("cost", "sum(deposit.amount) * 10% + sum(bet.amount) * 1%",
                                 approval_mode=pb.APPROVAL_MODE_MANUAL))
    ids = await seed(api, clock, "k", n)
    at = clock.now() - timedelta(hours=1)
    await record(api, "bets", [(c, "bet", "3", at) for i, c in enumerate(ids) if i % 3 == 0
                               for _ in range(2)])
    return ids


def _events_of(customer: str) -> int:
    return 1 + (2 if int(customer[1:]) % 3 == 0 else 0)


async def _listed_batches(api: Api) -> list[pb.BonusBatch]:
    return list((await stub(api).ListBonusBatches(pb.ListBonusBatchesRequest(
        definition_id="cost"), metadata=api.key())).batches)


async def test_the_recorded_cost_counts_stragglers_and_second_requests_exactly(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """Window 1: 10 requests whose job never ran (stragglers). Window 2: 60 customers, and a
    second request for 20 of them (a second, smaller aggregate pass). Window 2's batch computes
    all 90: ListBonusBatches shows requests 90, customers 60 (distinct), events_read the
    deposits and bets those 90 calculations counted (lines 64-67, 86-87)."""
    ids = await _cost_setup(api, clock, 60)
    await request(api, "cost", ids[:10], "w1", role="admin")
    clock.set(T0 + timedelta(minutes=5))
    await request(api, "cost", ids, "w2a", role="admin")
    second = await request(api, "cost", ids[:20], "w2b", role="admin")
    pk = await definition_pk(pool, "cost")
    report = await repo.run_batch(pool, pk, second.window_start.ToDatetime(UTC),
                                  now=second.due_time.ToDatetime(UTC))
    expected = sum(_events_of(c) for c in ids[:10] + ids + ids[:20])
    assert (report.requests, report.customers, report.events_read) == (90, 60, expected)
    listed = {b.window_start.ToDatetime(UTC): b for b in await _listed_batches(api)}
    shown = listed[second.window_start.ToDatetime(UTC)]
    assert (shown.request_count, shown.customer_count, shown.events_read) == (90, 60, expected)
    stored = sum(a["count"] for r in await pool.fetch("SELECT aggregates FROM bonus_results")
                 for a in repo._json(r["aggregates"]))
    assert stored == expected


async def test_a_batch_started_again_by_an_edit_records_each_customer_once(
        api: Api, pool: asyncpg.Pool, clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """100 requests for 100 customers, 40 per result transaction. The batch is held after its
    first chunk committed; a formula edit commits; the batch starts again with the edited
    definition (DefinitionChanged) and computes the 60 left. The batch's record should say
    what the window cost for what it computed: 100 requests, 100 customers, the events the 100
    results counted. Observed: customers 160 and the 60 customers' events counted twice,
    because run_batch adds each attempt's Cost (storage/bonuses.py _compute_and_write's
    ``finally``, run once per attempt of run_batch's DEFINITION_CHANGE_RETRIES loop)."""
    monkeypatch.setattr(repo, "WRITE_CHUNK", 40)
    ids = await _cost_setup(api, clock, 100)
    accepted = await request(api, "cost", ids, "all", role="admin")
    pk = await definition_pk(pool, "cost")
    pause = pause_before_write(monkeypatch, at=2)
    batch = asyncio.ensure_future(repo.run_batch(
        pool, pk, accepted.window_start.ToDatetime(UTC),
        now=accepted.due_time.ToDatetime(UTC)))
    await pause.wait(batch)
    await edit(api, "edit-cost", ["formula"], definition_id="cost",
               formula="sum(deposit.amount) * 20% + sum(bet.amount) * 1%")
    pause.release.set()
    report = await asyncio.wait_for(batch, DEADLINE)
    assert report.requests == 100
    assert await assert_exactly_once(pool, "cost", 100) == {"CALCULATED": 100}
    [shown] = await _listed_batches(api)
    expected = sum(_events_of(c) for c in ids)
    assert (shown.request_count, shown.customer_count, shown.events_read) == (
        100, 100, expected)


# --- 4. two workers on one window ---------------------------------------------------------------


async def test_second_copies_of_a_held_batch_stand_aside_and_find_nothing_afterwards(
        api: Api, pool: asyncpg.Pool, second_pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The window's job runs on worker 1 and is held after its first chunk committed. A
    second arq copy of the same job on worker 2 answers "already running" and leaves the row
    alone; storage.bonuses.run_batch on worker 2 is BatchBusy; the sweeper's re-arm hook arms
    nothing (the job is not finished). Worker 1 finishes; the second copy delivered again is
    "not due or already done". One result, ledger row and event of each kind per request; the
    batch counted 100 requests (lines 75-78)."""
    monkeypatch.setattr(repo, "WRITE_CHUNK", 40)
    pk, window, due, _ = await _manual_batch(api, pool, clock, "twice", 100,
                                             approval_mode=pb.APPROVAL_MODE_AUTOMATIC)
    job_id = await batch_job(pool, pk, window)
    worker_clock = FixedClock(due)
    pause = pause_before_write(monkeypatch, at=2)
    first = asyncio.ensure_future(run_outbox_job(ctx(pool, worker_clock, settings), job_id))
    await pause.wait(first)
    assert await run_outbox_job(ctx(second_pool, worker_clock, settings),
                                job_id) == "already running"
    with pytest.raises(repo.BatchBusy):
        await repo.run_batch(second_pool, pk, window, now=due)
    await rearm_stranded_batches(ctx(second_pool, worker_clock, settings))
    job = await pool.fetchrow("SELECT status, attempts FROM outbox_jobs WHERE id = $1", job_id)
    assert (job["status"], job["attempts"]) == ("pending", 2)
    pause.release.set()
    assert await asyncio.wait_for(first, DEADLINE) == "done"
    assert await run_outbox_job(ctx(second_pool, worker_clock, settings),
                                job_id) == "not due or already done"
    await rearm_stranded_batches(ctx(second_pool, worker_clock, settings))
    assert await run_due(pool, settings, worker_clock) == []
    assert await assert_exactly_once(pool, "twice", 100) == {"ISSUED": 100}
    assert await pool.fetchval(
        "SELECT request_count FROM bonus_batches WHERE definition_pk = $1", pk) == 100


async def test_the_next_windows_job_is_put_off_seconds_not_a_lease_while_the_last_one_runs(
        api: Api, pool: asyncpg.Pool, second_pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock, monkeypatch: pytest.MonkeyPatch) -> None:
    """Window 1's job runs on worker 1 and is held after its first chunk. Window 2's job
    starts on worker 2: its requests are not window 1's, so it is "deferred" 5 s (the attempt
    given back, the row due at +5 s and leased a lease past that for its own re-queued copy),
    instead of answering "already running" and waiting out a 300 s lease. Due again while
    window 1 still runs, it is put off again; after window 1 finishes it computes window 2:
    every request once."""
    monkeypatch.setattr(repo, "WRITE_CHUNK", 40)
    pk, window, due, ids = await _manual_batch(api, pool, clock, "next", 100,
                                               approval_mode=pb.APPROVAL_MODE_AUTOMATIC)
    clock.set(due + timedelta(seconds=1))  # inside the next window
    second = await request(api, "next", ids[:30], "next-w2", role="admin")
    window2 = second.window_start.ToDatetime(UTC)
    assert window2 > window
    job1, job2 = await batch_job(pool, pk, window), await batch_job(pool, pk, window2)
    pause = pause_before_write(monkeypatch, at=2)
    first = asyncio.ensure_future(run_outbox_job(ctx(pool, FixedClock(due), settings), job1))
    await pause.wait(first)
    due2 = second.due_time.ToDatetime(UTC)
    worker2 = FixedClock(due2)
    assert await run_outbox_job(ctx(second_pool, worker2, settings), job2) == "deferred"
    row = await pool.fetchrow(
        "SELECT status, attempts, due_at, locked_until, last_error FROM outbox_jobs WHERE id = $1",
        job2)
    assert (row["status"], row["attempts"], row["last_error"]) == ("pending", 0, None)
    assert row["due_at"] == due2 + timedelta(seconds=5)
    assert row["locked_until"] is None  # no Redis in this worker: the sweeper queues it
    worker2.set(due2 + timedelta(seconds=5))
    assert await run_outbox_job(ctx(second_pool, worker2, settings), job2) == "deferred"
    assert await pool.fetchval("SELECT attempts FROM outbox_jobs WHERE id = $1", job2) == 0
    pause.release.set()
    assert await asyncio.wait_for(first, DEADLINE) == "done"
    worker2.set(due2 + timedelta(seconds=10))
    assert await run_outbox_job(ctx(second_pool, worker2, settings), job2) == "done"
    assert await pool.fetchval("SELECT attempts FROM outbox_jobs WHERE id = $1", job2) == 1
    assert await pending(pool, pk) == 0
    assert await assert_exactly_once(pool, "next", 130) == {"ISSUED": 130}


async def test_a_deferred_job_queues_its_own_next_run_in_redis(
        api: Api, pool: asyncpg.Pool, second_pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock, arq_redis: Any) -> None:
    """With Redis, the put-off job queues its next run itself, under an arq id of its own
    (the attempt count repeats), deferred to the retry time; the row stays leased a lease
    past it, so the sweeper does not queue a second copy unless that one is lost."""
    pk, _, due, ids = await _manual_batch(api, pool, clock, "nextq", 10,
                                          approval_mode=pb.APPROVAL_MODE_AUTOMATIC)
    clock.set(due + timedelta(seconds=1))
    second = await request(api, "nextq", ids[:3], "nextq-w2", role="admin")
    job2 = await batch_job(pool, pk, second.window_start.ToDatetime(UTC))
    due2 = second.due_time.ToDatetime(UTC)
    worker_ctx = dict(ctx(second_pool, FixedClock(due2), settings), redis=arq_redis)
    async with pool.acquire() as holder:  # an earlier window's batch holds the definition
        await holder.execute("SELECT pg_advisory_lock(7009, $1)", pk)
        try:
            assert await run_outbox_job(worker_ctx, job2) == "deferred"
        finally:
            await holder.execute("SELECT pg_advisory_unlock(7009, $1)", pk)
    retry_at = due2 + timedelta(seconds=5)
    row = await pool.fetchrow("SELECT attempts, due_at, locked_until FROM outbox_jobs "
                              "WHERE id = $1", job2)
    assert (row["attempts"], row["due_at"]) == (0, retry_at)
    assert row["locked_until"] == retry_at + timedelta(seconds=settings.job_lease_seconds)
    arq_id = outbox_job_id(settings.queue_name, job2, 0, fresh_arming(retry_at))
    info = await Job(arq_id, arq_redis, _queue_name=settings.queue_name).info()
    assert info is not None and info.args == (job2,)


async def test_a_long_wait_for_another_batch_grows_its_retry_and_is_logged(
        api: Api, pool: asyncpg.Pool, second_pool: asyncpg.Pool, settings: Settings,
        clock: FixedClock, caplog: pytest.LogCaptureFixture) -> None:
    """The definition held (a batch that hangs): the put-off job's next try is a quarter of
    the time waited since its window closed, at most 60 s, and once it has waited longer than
    a job lease each try logs a warning naming the definition and the wait."""
    pk, _, due, ids = await _manual_batch(api, pool, clock, "hung", 5,
                                          approval_mode=pb.APPROVAL_MODE_AUTOMATIC)
    clock.set(due + timedelta(seconds=1))
    second = await request(api, "hung", ids[:2], "hung-w2", role="admin")
    job2 = await batch_job(pool, pk, second.window_start.ToDatetime(UTC))
    due2 = second.due_time.ToDatetime(UTC)
    lease = settings.job_lease_seconds
    async with pool.acquire() as holder:
        await holder.execute("SELECT pg_advisory_lock(7009, $1)", pk)
        try:
            for waited, expected in ((100, 25), (lease + 100, 60)):
                worker = FixedClock(due2 + timedelta(seconds=waited))
                with caplog.at_level("WARNING", logger="promo.bonuses"):
                    caplog.clear()
                    assert await run_outbox_job(ctx(second_pool, worker, settings),
                                                job2) == "deferred"
                row = await pool.fetchrow("SELECT due_at, attempts FROM outbox_jobs "
                                          "WHERE id = $1", job2)
                assert row["due_at"] == worker.now() + timedelta(seconds=expected)
                assert row["attempts"] == 0
                warned = [r for r in caplog.records
                          if r.getMessage() == "bonus batch waits for another batch of its "
                                               "definition"]
                assert len(warned) == (1 if waited > lease else 0)
                if warned:
                    assert (warned[0].definition_pk, warned[0].waited_s) == (pk, waited)
        finally:
            await holder.execute("SELECT pg_advisory_unlock(7009, $1)", pk)


async def test_a_deferred_job_never_reopens_a_job_another_copy_finished(
        pool: asyncpg.Pool) -> None:
    """storage.outbox.defer_attempt gives back only the attempt it counted: a row another copy
    finished (or started again) meanwhile is left as it is."""
    now = T0
    job_id = await outbox.add_job(pool, kind="bonus.batch", payload={}, due_at=now)
    async with pool.acquire() as conn:
        started = await outbox.start_attempt(conn, job_id, now=now, lease=timedelta(minutes=5))
        assert started is not None and started.attempts == 1
        await outbox.finish_job(conn, job_id, now=now)
        assert not await outbox.defer_attempt(conn, job_id, attempts=1,
                                              retry_at=now + timedelta(seconds=5),
                                              lease_until=None)
        row = await conn.fetchrow("SELECT status, attempts FROM outbox_jobs WHERE id = $1",
                                  job_id)
    assert (row["status"], row["attempts"]) == ("done", 1)


async def test_a_worker_losing_its_lock_connection_mid_chunk_doubles_nothing(
        api: Api, pool: asyncpg.Pool, second_pool: asyncpg.Pool, clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker 1's batch holds its first result transaction open (writer connection) when the
    connection holding its advisory lock is killed (pg_terminate_backend: a network cut, a
    failover). The lock is gone, so worker 2's run_batch starts on the same pending requests
    (the held chunk is not committed yet) and its claim waits on worker 1's chunk. Released,
    worker 1's chunk commits and worker 2 skips those requests (claimed by UPDATE ... WHERE
    status = 'PENDING', lines 72-74): every request has exactly one result, ledger row and
    event of each kind, whatever worker 1's run then reports."""
    monkeypatch.setattr(repo, "WRITE_CHUNK", 40)
    pk, window, due, _ = await _manual_batch(api, pool, clock, "lost", 100,
                                             approval_mode=pb.APPROVAL_MODE_AUTOMATIC)
    pause = pause_after_claim(monkeypatch, at=1)
    first = asyncio.ensure_future(repo.run_batch(pool, pk, window, now=due))
    await pause.wait(first)
    assert await pool.fetchval("SELECT count(*) FROM bonus_results") == 0  # uncommitted
    killed = await second_pool.fetchval(
        """SELECT count(pg_terminate_backend(l.pid)) FROM pg_locks l
            WHERE l.locktype = 'advisory' AND l.classid = 7009 AND l.objid = $1
              AND l.database = (SELECT oid FROM pg_database
                                 WHERE datname = current_database())""", pk)
    assert killed == 1
    second = asyncio.ensure_future(repo.run_batch(second_pool, pk, window, now=due))
    await waits_on_lock(second_pool, "SET status = 'DONE'", second)
    pause.release.set()
    replies = await asyncio.wait_for(asyncio.gather(first, second, return_exceptions=True),
                                     DEADLINE)
    assert not isinstance(replies[1], BaseException), replies[1]
    assert await pending(pool, pk) == 0
    assert await assert_exactly_once(pool, "lost", 100) == {"ISSUED": 100}


# --- 5. the retention purge racing approvals and batches ----------------------------------------


async def _old_results(api: Api, pool: asyncpg.Pool, clock: FixedClock,
                       definition_id: str, n: int) -> tuple[int, list[str]]:
    """``n`` CALCULATED results computed at T0's window end; the clock then 31 days later."""
    pk, window, due, ids = await _manual_batch(api, pool, clock, definition_id, n)
    await repo.run_batch(pool, pk, window, now=due)
    by_customer = {r["customer_id"]: r["bonus_id"] for r in await result_rows(pool,
                                                                               definition_id)}
    clock.set(due + timedelta(days=31))
    return pk, [by_customer[c] for c in ids]


def hold_decisions(monkeypatch: pytest.MonkeyPatch) -> Pause:
    """Hold the first approval/rejection inside its transaction, its result rows locked and
    updated."""
    pause = Pause()
    original = repo.decide_results

    async def held(*args: Any, **kw: Any) -> Any:
        decided = await original(*args, **kw)
        await pause.point()
        return decided

    monkeypatch.setattr(repo, "decide_results", held)
    return pause


async def test_an_approval_in_progress_is_skipped_by_the_results_purge_and_issued_once(
        api: Api, pool: asyncpg.Pool, clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Three 31-day-old CALCULATED results; the approval of the first is held inside its
    transaction (its row locked) when the purge's results statement runs: it deletes the two
    others and skips the locked one (SKIP LOCKED); the approval commits, the result is issued
    with one ledger row and one Issued event; the next full purge deletes it, the ledger
    stays."""
    _, bonus = await _old_results(api, pool, clock, "keep", 3)
    pause = hold_decisions(monkeypatch)
    approval = asyncio.ensure_future(approve(api, "approve-old", [bonus[0]]))
    await pause.wait(approval)
    row = await pool.fetchrow(retention._BONUS_RESULTS_SQL, clock.now() - timedelta(days=30),
                              retention.CHUNK)
    assert (row["deleted"], row["unapproved"]) == (2, 2)
    pause.release.set()
    [issued] = (await asyncio.wait_for(approval, DEADLINE)).results
    assert issued.status == pb.BONUS_STATUS_ISSUED
    assert [r["status"] for r in await result_rows(pool, "keep")] == ["ISSUED"]
    assert await pool.fetchval("SELECT count(*) FROM bonus_ledger") == 1
    assert [e["bonus_id"] for e in await bonus_events(pool)
            if e["event_type"] == ISSUED_EVENT] == [bonus[0]]
    async with pool.acquire() as conn:
        again = await retention.purge_bonus_history(conn, now=clock.now(), days=30)
    assert again == (1, 3, 1) and await result_rows(pool, "keep") == []
    assert await pool.fetchval("SELECT count(*) FROM bonus_ledger") == 1


async def test_the_purge_does_not_wait_for_an_approval_in_progress(
        api: Api, pool: asyncpg.Pool, clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """storage/retention.py promises statements that take their rows SKIP LOCKED ("a row a
    worker is busy with is left for the next run") and hold locks for milliseconds. With an
    approval of a 31-day-old result held open, the whole purge_bonus_history should still
    finish. Observed: the results and requests statements skip the locked row, but the
    batches statement (_BONUS_BATCHES_SQL, its ``unlinked`` CTE) blocks on the approval's row
    while holding the batch rows it deleted: the hourly purge waits as long as the approval,
    or a recalculation of a whole definition (which locks every waiting result)."""
    _, bonus = await _old_results(api, pool, clock, "wait", 3)
    pause = hold_decisions(monkeypatch)
    approval = asyncio.ensure_future(approve(api, "approve-old", [bonus[0]]))
    await pause.wait(approval)

    async def purge() -> tuple[int, int, int]:
        async with pool.acquire() as conn:
            return await retention.purge_bonus_history(conn, now=clock.now(), days=30)

    purging = asyncio.ensure_future(purge())
    waited = False
    try:
        deadline = asyncio.get_running_loop().time() + DEADLINE
        while not purging.done() and asyncio.get_running_loop().time() < deadline:
            if await pool.fetchval(
                    """SELECT count(*) FROM pg_stat_activity
                        WHERE datname = current_database() AND wait_event_type = 'Lock'
                          AND query LIKE '%DELETE FROM bonus_%'"""):
                waited = True
                break
            await asyncio.sleep(0.01)
    finally:
        pause.release.set()
        await asyncio.wait_for(approval, DEADLINE)
        counts = await asyncio.wait_for(purging, DEADLINE)
    assert not waited, "the purge waited for the approval's transaction"
    assert counts[0] == 2


async def test_an_approval_waiting_on_a_purge_in_progress_decides_nothing(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """The purge's delete of 31-day-old results is in progress (its statement run in a
    transaction not yet committed) when an operator approves two of them: the approval waits,
    then answers NOT_FOUND BONUS_RESULT_NOT_FOUND and issues nothing (all or none): no ledger
    row, no Issued event."""
    _, bonus = await _old_results(api, pool, clock, "gone", 3)
    cutoff = clock.now() - timedelta(days=30)
    async with pool.acquire() as purge:
        transaction = purge.transaction()
        await transaction.start()
        row = await purge.fetchrow(retention._BONUS_RESULTS_SQL, cutoff, 5000)
        assert row["deleted"] == 3 and row["unapproved"] == 3
        approval = asyncio.ensure_future(approve(api, "too-late", bonus[:2]))
        await waits_on_lock(pool, "FOR UPDATE", approval)
        await transaction.commit()
    with pytest.raises(grpc.RpcError) as refused:
        await asyncio.wait_for(approval, DEADLINE)
    assert reason_of(refused.value) == "NOT_FOUND:BONUS_RESULT_NOT_FOUND"
    assert await pool.fetchval("SELECT count(*) FROM bonus_ledger") == 0
    assert [e for e in await bonus_events(pool) if e["event_type"] == ISSUED_EVENT] == []


async def test_a_batch_running_while_the_purge_takes_its_windows_old_record_keeps_its_cost(
        api: Api, pool: asyncpg.Pool, clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A window's batch ran 31 days ago. A request joins that window late, as a schedule run
    caught up "as of its own scheduled time, back to 31 days" does (docs/bonuses.md lines
    57-60, 273-275): the finished job is armed again. Its batch is held before its first
    result transaction while the retention purge runs. The purge used to delete the window's
    batch record (finished 31 days ago): the batch then computed the request, but
    ListBonusBatches showed no record of this run (lines 86-87: each window's cost), and the
    new result pointed at a batch id that no longer existed. Now the late request makes the
    record unfinished again, so the purge leaves it (and the old results' requests go), and
    the run adds its cost to the window's record."""
    pk, window, due, ids = await _manual_batch(api, pool, clock, "late", 2,
                                               approval_mode=pb.APPROVAL_MODE_AUTOMATIC)
    await repo.run_batch(pool, pk, window, now=due)
    clock.set(due + timedelta(days=31))
    async with pool.acquire() as conn, conn.transaction():
        row = await repo.get_definition(conn, "late")
        late = await repo.add_requests(conn, row, [repo.NewRequest(ids[1], "caught-up/" + ids[1])],
                                       now=T0 + timedelta(minutes=2), default_window=300)
    assert late.window_start == window
    pause = pause_before_write(monkeypatch, at=1)
    batch = asyncio.ensure_future(repo.run_batch(pool, pk, window, now=clock.now()))
    await pause.wait(batch)
    async with pool.acquire() as conn:
        purged = await retention.purge_bonus_history(conn, now=clock.now(), days=30)
    assert purged == (2, 2, 0)  # the window's two old results and their requests, not its record
    pause.release.set()
    report = await asyncio.wait_for(batch, DEADLINE)
    assert report.requests == 1
    [result] = await result_rows(pool, "late")
    assert (result["customer_id"], result["status"]) == (ids[1], "ISSUED")
    batches = list((await stub(api).ListBonusBatches(pb.ListBonusBatchesRequest(
        definition_id="late"), metadata=api.key())).batches)
    assert [(b.window_start.ToDatetime(UTC), b.request_count) for b in batches] == [
        (window, 3)]  # the first run's 2 and this run's 1
