"""The dynamic-bonus batch below the API, on real PostgreSQL: one job per window, a crash in the
middle loses nothing and issues nothing twice, a second copy of the job waits, stragglers of an
earlier window are picked up, points and templates reach the ledger, results are purged after
30 days while the ledger stays."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from config.settings import Settings
from core.bonuses.definitions import (
    ApprovalMode,
    BonusDefinition,
    DataMode,
    PointsTarget,
    ResultType,
    validate_definition,
)
from core.customers import Customer, Event
from core.periods import TimeBackPeriod
from core.rounding import RoundingMode
from storage import bonuses as repo
from storage import customers as customers_repo
from storage import events as events_repo
from storage import retention
from workers import bonuses as _bonus_jobs  # noqa: F401  registers the bonus.batch handler
from workers.outbox import run_outbox_job

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)


def definition(definition_id: str = "d1", **kw: Any) -> BonusDefinition:
    fields: dict[str, Any] = dict(
        definition_id=definition_id, display_name="", formula="sum(deposit.amount) * 10%",
        result_type=ResultType.AMOUNT, points_target=None, min_allowed=None, cap_amount=None,
        rounding=RoundingMode.NONE, decimals=2, rounding_factor=None,
        data_mode=DataMode.TRANSACTIONS_AND_PROPERTIES, period=TimeBackPeriod(1, "days"),
        approval_mode=ApprovalMode.AUTOMATIC, batch_window_seconds=None)
    fields.update(kw)
    return BonusDefinition(**fields)


async def setup(pool: asyncpg.Pool, d: BonusDefinition, customers: int,
                properties: dict[str, Any] | None = None) -> repo.DefinitionRow:
    checked, compiled = validate_definition(d)
    async with pool.acquire() as conn, conn.transaction():
        await customers_repo.upsert(conn, [
            Customer(f"c{i}", "UTC", "EUR", properties or {}) for i in range(customers)])
        await events_repo.insert_batch(conn, [
            Event(f"e{i}", f"c{i}", "deposit", Decimal(10 * (i + 1)), "EUR",
                  NOW - timedelta(hours=1)) for i in range(customers)], create_missing=False)
        return await repo.insert_definition(conn, checked, compiled, now=NOW)


async def add(pool: asyncpg.Pool, row: repo.DefinitionRow, ids: list[str], key: str,
              now: datetime = NOW) -> repo.Accepted:
    async with pool.acquire() as conn, conn.transaction():
        return await repo.add_requests(conn, row, [repo.NewRequest(c, f"{key}/{c}") for c in ids],
                                       now=now, default_window=300)


async def count(pool: asyncpg.Pool, sql: str, *args: Any) -> int:
    async with pool.acquire() as conn:
        return int(await conn.fetchval(sql, *args))


def ctx(pool: asyncpg.Pool, settings: Settings, now: datetime) -> dict[str, Any]:
    from core.clock import FixedClock

    return {"pool": pool, "clock": FixedClock(now), "settings": settings}


async def test_one_job_per_window_and_a_retry_adds_nothing(pool: asyncpg.Pool,
                                                           settings: Settings) -> None:
    row = await setup(pool, definition(), 3)
    first = await add(pool, row, ["c0", "c1"], "r1")
    second = await add(pool, row, ["c2"], "r2", NOW + timedelta(minutes=4))
    again = await add(pool, row, ["c0", "c1"], "r1", NOW + timedelta(minutes=4))
    assert first.outbox_job_id is not None and second.outbox_job_id is None
    assert again.accepted == 0 and again.outbox_job_id is None
    assert (first.window_start, first.due_at) == (NOW, NOW + timedelta(minutes=5))
    assert await count(pool, "SELECT count(*) FROM bonus_requests") == 3
    assert await count(pool, "SELECT count(*) FROM outbox_jobs WHERE kind = 'bonus.batch'") == 1

    early = ctx(pool, settings, NOW + timedelta(minutes=4))
    async with pool.acquire() as conn:  # a job started before the window closed: tried later
        await conn.execute("UPDATE outbox_jobs SET due_at = $1", NOW)
    assert await run_outbox_job(early, first.outbox_job_id) == "pending"
    assert await count(pool, "SELECT count(*) FROM bonus_results") == 0
    async with pool.acquire() as conn:
        await conn.execute("UPDATE outbox_jobs SET due_at = $1", NOW + timedelta(minutes=5))
    due = ctx(pool, settings, NOW + timedelta(minutes=5))
    assert await run_outbox_job(due, first.outbox_job_id) == "done"
    assert await count(pool, "SELECT count(*) FROM bonus_results WHERE status = 'ISSUED'") == 3
    report = await repo.run_batch(pool, row.pk, NOW, now=NOW + timedelta(minutes=6))
    assert report.requests == 0  # run again (at least once delivery): nothing new
    assert await count(pool, "SELECT count(*) FROM bonus_ledger") == 3
    assert await count(pool, "SELECT count(*) FROM webhook_events") == 6  # calculated + issued


async def test_a_crash_mid_batch_loses_nothing_and_issues_nothing_twice(
        pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    row = await setup(pool, definition(), 5)
    await add(pool, row, [f"c{i}" for i in range(5)], "r1")
    monkeypatch.setattr(repo, "WRITE_CHUNK", 2)
    real_emit = repo.emit_events
    calls = 0

    async def failing_emit(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:  # the 2nd chunk's events: the worker dies mid-transaction
            raise ConnectionError("worker lost its database connection")
        return await real_emit(*args, **kw)

    monkeypatch.setattr(repo, "emit_events", failing_emit)
    with pytest.raises(ConnectionError):
        await repo.run_batch(pool, row.pk, NOW, now=NOW + timedelta(minutes=5))
    assert await count(pool, "SELECT count(*) FROM bonus_results") == 2  # the 1st chunk
    assert await count(pool, "SELECT count(*) FROM bonus_ledger") == 2
    assert await count(pool,
                       "SELECT count(*) FROM bonus_requests WHERE status = 'PENDING'") == 3
    monkeypatch.setattr(repo, "emit_events", real_emit)
    report = await repo.run_batch(pool, row.pk, NOW, now=NOW + timedelta(minutes=6))
    assert report.requests == 3
    assert await count(pool, "SELECT count(*) FROM bonus_results") == 5
    assert await count(pool, "SELECT count(DISTINCT bonus_id) FROM bonus_ledger") == 5
    assert await count(pool, "SELECT count(*) FROM webhook_events") == 10
    async with pool.acquire() as conn:
        amounts = [r["amount"] for r in await conn.fetch(
            "SELECT amount FROM bonus_ledger ORDER BY customer_id")]
        batch = await conn.fetchrow("SELECT * FROM bonus_batches")
    assert amounts == [Decimal(i) for i in range(1, 6)]
    assert (batch["request_count"], batch["events_read"]) == (3, 3)  # the run that finished


async def test_a_second_copy_of_the_batch_waits_for_the_first(pool: asyncpg.Pool,
                                                              settings: Settings) -> None:
    row = await setup(pool, definition(), 2)
    accepted = await add(pool, row, ["c0", "c1"], "r1")
    assert accepted.outbox_job_id is not None
    batch_pk = await pool.fetchval("SELECT id FROM bonus_batches WHERE definition_pk = $1",
                                   row.pk)
    async with pool.acquire() as holder:  # what a running copy of this window's job holds
        await holder.execute("SELECT pg_advisory_lock(7011, $1::int)", batch_pk)
        await holder.execute("SELECT pg_advisory_lock(7009, $1)", row.pk)
        with pytest.raises(repo.WindowBusy):
            await repo.run_batch(pool, row.pk, NOW, now=NOW + timedelta(minutes=5))
        result = await run_outbox_job(ctx(pool, settings, NOW + timedelta(minutes=5)),
                                      accepted.outbox_job_id)
        assert result == "already running"
        await holder.execute("SELECT pg_advisory_unlock(7011, $1::int)", batch_pk)
        # Only the definition held (another window's batch): put off a few seconds.
        with pytest.raises(repo.DefinitionBusy):
            await repo.run_batch(pool, row.pk, NOW, now=NOW + timedelta(minutes=5))
        result = await run_outbox_job(ctx(pool, settings, NOW + timedelta(minutes=5)),
                                      accepted.outbox_job_id)
        assert result == "deferred"
        await holder.execute("SELECT pg_advisory_unlock(7009, $1)", row.pk)
    assert await count(pool, "SELECT count(*) FROM bonus_results") == 0
    # Neither refusal left a lock behind.
    assert await count(pool, """SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'
                                   AND database = (SELECT oid FROM pg_database
                                                    WHERE datname = current_database())""") == 0
    report = await repo.run_batch(pool, row.pk, NOW, now=NOW + timedelta(minutes=5))
    assert report.requests == 2


async def test_stragglers_of_an_earlier_window_join_the_next_batch(pool: asyncpg.Pool) -> None:
    row = await setup(pool, definition(), 2)
    await add(pool, row, ["c0"], "r1")
    later = NOW + timedelta(minutes=7)
    await add(pool, row, ["c1"], "r2", later)
    report = await repo.run_batch(pool, row.pk, NOW + timedelta(minutes=5),
                                  now=later + timedelta(minutes=3))
    assert report.requests == 2 and report.customers == 2


async def test_points_and_templates_reach_the_ledger(pool: asyncpg.Pool) -> None:
    points = await setup(pool, definition(
        "logins", formula='customer["Logins count ever"] * 2', result_type=ResultType.POINTS,
        points_target=PointsTarget.LEVEL_PROGRESS, data_mode=DataMode.PROPERTIES_ONLY,
        period=None), 2, {"Logins count ever": Decimal(21)})
    await add(pool, points, ["c0", "c1"], "p")
    await repo.run_batch(pool, points.pk, NOW, now=NOW + timedelta(minutes=5))
    checked, compiled = validate_definition(definition(
        "spins", formula='if sum(deposit.amount) > 10 then template("10 Free Spins")',
        result_type=ResultType.BONUS_TEMPLATE))
    async with pool.acquire() as conn:
        spins = await repo.insert_definition(conn, checked, compiled, now=NOW)
    await add(pool, spins, ["c0", "c1"], "s")
    report = await repo.run_batch(pool, spins.pk, NOW, now=NOW + timedelta(minutes=5))
    assert report.statuses == {"SKIPPED": 1, "ISSUED": 1}
    async with pool.acquire() as conn:
        rows = [tuple(r) for r in await conn.fetch(
            """SELECT definition_id, customer_id, result_type, points_target, amount, template,
                      source FROM bonus_ledger ORDER BY id""")]
    assert rows == [
        ("logins", "c0", "POINTS", "LEVEL_PROGRESS", Decimal(42), None, "DYNAMIC_FORMULA"),
        ("logins", "c1", "POINTS", "LEVEL_PROGRESS", Decimal(42), None, "DYNAMIC_FORMULA"),
        ("spins", "c1", "BONUS_TEMPLATE", None, None, "10 Free Spins", "DYNAMIC_FORMULA")]


async def test_results_older_than_30_days_are_purged_and_the_ledger_stays(
        pool: asyncpg.Pool, settings: Settings) -> None:
    row = await setup(pool, replace(definition(), approval_mode=ApprovalMode.MANUAL), 2)
    await add(pool, row, ["c0"], "old")
    await repo.run_batch(pool, row.pk, NOW, now=NOW + timedelta(minutes=5))
    later = NOW + timedelta(days=29)
    await add(pool, row, ["c1"], "new", later)
    await repo.run_batch(pool, row.pk, later, now=later + timedelta(minutes=5))
    async with pool.acquire() as conn:
        await conn.execute("INSERT INTO bonus_ledger (bonus_id, customer_id, definition_id, "
                           "result_type, issue_time) SELECT bonus_id, customer_id, 'd1', "
                           "'AMOUNT', calculate_time FROM bonus_results")
    async with pool.acquire() as conn:
        purged = await retention.purge_bonus_history(
            conn, now=NOW + timedelta(days=30, minutes=6), days=30, chunk=1)
    assert purged == (1, 1, 1)  # c0's result, its request, the first window's batch record
    assert await count(pool, "SELECT count(*) FROM bonus_results") == 1
    assert await count(pool, "SELECT count(*) FROM bonus_requests") == 1
    assert await count(pool, "SELECT count(*) FROM bonus_ledger") == 2
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT customer_id FROM bonus_results") == "c1"
        assert await retention.purge_bonus_history(
            conn, now=NOW + timedelta(days=60), days=0) == (0, 0, 0)  # 0 keeps them forever
        assert await retention.purge_bonus_history(
            conn, now=NOW + timedelta(days=60), days=30) == (1, 1, 1)
    assert await count(pool, "SELECT count(*) FROM bonus_results") == 0


def test_batch_event_bodies_are_the_envelopes_bytes() -> None:
    from core.bonuses.results import BonusStatus, event_payload
    from core.events import Envelope, EventType

    data = event_payload(
        bonus_id="b1", definition_id="d1", customer_id="ç1", status=BonusStatus.CALCULATED,
        result_type="AMOUNT", amount=Decimal("12.50"), template=None, currency="EUR",
        skip_reason=None, skip_detail=None, period_start=NOW, period_end=NOW,
        requires_approval=True, issued_at=None, message_template="{{event.bonus_amount}} €")
    ours = repo._body("e1", EventType.BONUS_CALCULATED, NOW, data)
    theirs = Envelope(event_id="e1", event_type=EventType.BONUS_CALCULATED, occurred_at=NOW,
                      data=data).body().decode()
    assert ours == theirs


async def test_two_writers_crashing_mid_batch_lose_nothing_and_issue_nothing_twice(
        pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large batch writes on two connections at once; one failing chunk stops both, and
    whatever committed is whole (result, DONE request, ledger entry, events together)."""
    row = await setup(pool, definition(), 9)
    await add(pool, row, [f"c{i}" for i in range(9)], "r1")
    monkeypatch.setattr(repo, "WRITE_CHUNK", 2)
    monkeypatch.setattr(repo, "PARALLEL_WRITES_FROM", 2)
    real_emit = repo.emit_events
    calls = 0

    async def failing_emit(*args: Any, **kw: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise ConnectionError("worker lost its database connection")
        return await real_emit(*args, **kw)

    monkeypatch.setattr(repo, "emit_events", failing_emit)
    with pytest.raises(ConnectionError):
        await repo.run_batch(pool, row.pk, NOW, now=NOW + timedelta(minutes=5))
    results = await count(pool, "SELECT count(*) FROM bonus_results")
    assert 2 <= results <= 6 and results % 2 == 0  # whole chunks of 2, never the failed one
    assert await count(pool, "SELECT count(*) FROM bonus_ledger") == results
    assert await count(pool, "SELECT count(*) FROM webhook_events") == 2 * results
    assert await count(pool, """SELECT count(*) FROM bonus_requests q
                                 WHERE (q.status = 'DONE') <> EXISTS (
                                       SELECT 1 FROM bonus_results r WHERE r.request_pk = q.id)
                             """) == 0
    monkeypatch.setattr(repo, "emit_events", real_emit)
    report = await repo.run_batch(pool, row.pk, NOW, now=NOW + timedelta(minutes=6))
    assert report.requests == 9 - results
    assert report.statuses == {"ISSUED": 9 - results}
    assert await count(pool, "SELECT count(*) FROM bonus_results") == 9
    assert await count(pool, "SELECT count(DISTINCT request_pk) FROM bonus_results") == 9
    assert await count(pool, "SELECT count(DISTINCT bonus_id) FROM bonus_ledger") == 9
    assert await count(pool, "SELECT count(*) FROM webhook_events") == 18
    assert await count(pool,
                       "SELECT count(*) FROM bonus_requests WHERE status = 'PENDING'") == 0
    async with pool.acquire() as conn:
        amounts = [r["amount"] for r in await conn.fetch(
            "SELECT amount FROM bonus_ledger ORDER BY amount")]
    assert amounts == [Decimal(i) for i in range(1, 10)]


def test_generated_bonus_and_event_ids_are_random_version_4_uuids() -> None:
    import uuid

    ids = repo._uuid4s(500)
    assert len(set(ids)) == 500
    for text in ids:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (4, uuid.RFC_4122, text)


def test_stored_aggregates_are_what_json_dumps_gave() -> None:
    """_aggregates_json is built from fragments; the jsonb it stores must hold exactly what
    the plain json.dumps of the same list held."""
    import json

    from core.formula import AggregateValue, FormulaInputs, ResultOptions

    _, compiled = validate_definition(definition(
        formula='if count(deposit) > 5 then sum(bet.amount where game != "Rou\\"lette") '
                'else sum(win.amount) * 2'))
    keys = {spec.describe(): spec.key for spec in compiled.aggregates}
    evaluation = compiled.evaluate(FormulaInputs(
        aggregates={keys['sum(bet.amount where game != "Rou\\"lette")']:
                    AggregateValue(Decimal("12.500000"), 3),
                    keys["sum(win.amount)"]: AggregateValue(Decimal("0.250000"), 1),
                    keys["count(deposit)"]: AggregateValue(Decimal("2"), 2)},
        properties={}, currency="EUR"), ResultOptions())
    assert len(evaluation.aggregates_used) == 2  # one aggregate is not read: "read": false
    expected = []
    for spec in compiled.aggregates:
        value = evaluation.aggregates_used.get(spec.key)
        expected.append({"key": spec.key, "description": spec.describe(),
                         "value": None if value is None or value.value is None
                         else format(value.value, "f"),
                         "count": 0 if value is None else value.count,
                         "read": value is not None})
    assert json.loads(repo._aggregates_json(compiled, evaluation)) == expected


async def test_a_pool_of_one_connection_computes_then_writes(pool: asyncpg.Pool,
                                                             settings: Settings) -> None:
    """No second connection for a writer: the batch still completes, in the same chunks."""
    from storage.db import create_pool

    row = await setup(pool, definition(), 3)
    await add(pool, row, ["c0", "c1", "c2"], "r1")
    assert settings.database_url is not None
    single = await create_pool(settings.database_url, min_size=1, max_size=1)
    try:
        report = await repo.run_batch(single, row.pk, NOW, now=NOW + timedelta(minutes=5))
    finally:
        await single.close()
    assert (report.requests, report.statuses) == (3, {"ISSUED": 3})
    assert await count(pool, "SELECT count(*) FROM bonus_ledger") == 3
