"""Dynamic bonuses under operators' edits, late triggers and retention: regression tests for
defects a review found, each against the real stack (server, PostgreSQL, the worker's jobs and
sweep hooks) with a pinned clock.

- a request that joins a window whose batch already ran is still computed (the batch is armed
  again, and the sweeper re-arms any window left with pending requests);
- approving a result issues what the result says, even after the definition changed type;
- results waiting for approval go with the 30-day purge, with a warning;
- a recalculation after a period edit reads the new period;
- a batch running while the formula is edited never writes results of the replaced formula;
- the hourly retention job purges the bonus history and counts it.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import formulas_pb2 as fpb
from tests.conftest import Api
from tests.e2e.test_bonuses_api import (
    create,
    customers,
    definition,
    events,
    ledger,
    request,
    results,
    run_due_batches,
    stub,
)
from workers.bonuses import run_due_schedules


async def pending_requests(pool: asyncpg.Pool) -> list[str]:
    async with pool.acquire() as conn:
        return [r["customer_id"] for r in await conn.fetch(
            "SELECT customer_id FROM bonus_requests WHERE status = 'PENDING' ORDER BY id")]


async def manual_request_due(api: Api, clock: FixedClock) -> None:
    """A manual-approval definition (10% of deposits), customer m1 with a deposit of 250 an
    hour ago, one request for m1, and the clock at the end of its batching window."""
    await create(api, definition("manual-10", "sum(deposit.amount) * 10%",
                                 approval_mode=pb.APPROVAL_MODE_MANUAL))
    await customers(api, ("m1", "EUR", "UTC"))
    await events(api, "dep", ("m1", "deposit", "250", clock.now() - timedelta(hours=1), {}))
    await request(api, "manual-10", ["m1"], "r1")
    clock.advance(timedelta(minutes=5))


# --- a schedule run late joins a window whose batch already ran ---------------------------------


async def test_a_late_schedule_run_is_computed_even_if_its_window_already_ran(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """Workers were down at the scheduled time. Meanwhile an API request fell in the same
    5-minute window; when workers come back, that window's batch runs, then the sweeper makes
    the schedule's requests "as of the scheduled time", i.e. in the window that already ran.
    They must still get a batch (a job due now), not wait for some later request."""
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await customers(api, ("api1", "EUR", "UTC"), ("s1", "EUR", "UTC"))
    at = datetime.fromisoformat
    await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
        request_id="daily", schedule=pb.BonusSchedule(
            schedule_id="daily", definition_id="bets-10", customer_ids=["s1"],
            local_time="12:00", time_zone="UTC")), metadata=api.key())
    await events(api, "bets", ("api1", "bet", "10", at("2026-11-22T09:00:00+00:00"), {}),
                 ("s1", "bet", "20", at("2026-11-22T09:00:00+00:00"), {}))
    clock.set(at("2026-11-22T12:01:00+00:00"))  # the 12:00-12:05 window; no worker up
    await request(api, "bets-10", ["api1"], "api-request")
    clock.set(at("2026-11-22T12:20:00+00:00"))  # workers are back: the due batch runs first
    assert await run_due_batches(pool, settings, clock) == 1
    await run_due_schedules({"pool": pool, "clock": clock, "settings": settings})
    assert await pending_requests(pool) == ["s1"]  # the schedule ran (as of 12:00)

    clock.advance(timedelta(minutes=10))
    await run_due_batches(pool, settings, clock)
    assert await pending_requests(pool) == []  # observed: ['s1'], with no batch job at all
    assert sorted((r.customer_id, r.amount) for r in await results(api)) == [
        ("api1", "1"), ("s1", "2")]


async def test_the_sweeper_rearms_a_window_left_with_pending_requests(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """The race the request path cannot see: a request commits while its window's batch is
    finishing (the job still pending, so nothing is re-armed; then the runner marks it done).
    The sweeper finds the closed window with a pending request and queues its batch again."""
    from workers.bonuses import rearm_stranded_batches

    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await customers(api, ("c1", "EUR", "UTC"), ("c2", "EUR", "UTC"))
    await events(api, "bets", ("c1", "bet", "10", clock.now() - timedelta(hours=1), {}),
                 ("c2", "bet", "30", clock.now() - timedelta(hours=1), {}))
    await request(api, "bets-10", ["c1"], "r1")
    clock.advance(timedelta(minutes=5))
    assert await run_due_batches(pool, settings, clock) == 1
    async with pool.acquire() as conn:
        # Replay the race: the job is still running when c2's request commits ...
        await conn.execute("UPDATE outbox_jobs SET status = 'pending' WHERE kind = 'bonus.batch'")
        clock.advance(timedelta(minutes=-5))
        await request(api, "bets-10", ["c2"], "r2")
        clock.advance(timedelta(minutes=5))
        # ... and the runner then records it done, without having seen c2.
        await conn.execute("UPDATE outbox_jobs SET status = 'done' WHERE kind = 'bonus.batch'")
    assert await pending_requests(pool) == ["c2"]
    assert await run_due_batches(pool, settings, clock) == 0  # nothing would ever run it
    sweep = {"pool": pool, "clock": clock, "settings": settings}
    with caplog.at_level("WARNING", logger="promo.bonuses"):
        await rearm_stranded_batches(sweep)
    assert [r.getMessage() for r in caplog.records if r.levelname == "WARNING"] == [
        "bonus requests were left pending after their batch ran: batch queued again"]
    assert await run_due_batches(pool, settings, clock) == 1
    assert await pending_requests(pool) == []
    assert sorted((r.customer_id, r.amount) for r in await results(api)) == [
        ("c1", "1"), ("c2", "3")]
    caplog.clear()
    await rearm_stranded_batches(sweep)  # nothing left pending: nothing armed
    assert await run_due_batches(pool, settings, clock) == 0
    assert not [r for r in caplog.records if r.levelname == "WARNING"]


# --- approving after a definition edit issues under the new result type -------------------------


async def test_approval_issues_what_the_result_says_not_the_edited_definitions_type(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """A result calculated as an AMOUNT of 25 (EUR) waits for approval; the operator then edits
    the definition to give POINTS and, without recalculating, approves the waiting result, as
    the queue still shows it: an amount of 25. The ledger must record what was approved (an
    amount), not 25 points."""
    await manual_request_due(api, clock)
    await run_due_batches(pool, settings, clock)
    [waiting] = await results(api)
    assert (waiting.status, waiting.result_type, waiting.amount, waiting.currency) == (
        pb.BONUS_STATUS_CALCULATED, pb.BONUS_RESULT_TYPE_AMOUNT, "25", "EUR")
    await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
        request_id="to-points", definition=pb.BonusDefinition(
            definition_id="manual-10", result_type=pb.BONUS_RESULT_TYPE_POINTS,
            points_target=pb.POINTS_TARGET_BALANCE),
        update_mask={"paths": ["result_type", "points_target"]}), metadata=api.key())
    approved = await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
        request_id="approve", bonus_ids=[waiting.bonus_id]), metadata=api.key())
    assert approved.results[0].result_type == pb.BONUS_RESULT_TYPE_AMOUNT
    [entry] = await ledger(api, "m1")
    # observed: BONUS_RESULT_TYPE_POINTS / POINTS_TARGET_BALANCE (25 points instead of 25 EUR)
    assert (entry.result_type, entry.points_target, entry.amount) == (
        pb.BONUS_RESULT_TYPE_AMOUNT, pb.POINTS_TARGET_UNSPECIFIED, "25")


# --- the 30-day purge and results still waiting for an operator -------------------------------


async def test_the_30_day_purge_takes_waiting_results_too_and_says_so(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """Seed 004: "We are keeping only the last 30 days' records of dynamic bonuses that you can
    find in the Approval queue" (issue 7: results older than 30 days are purged), waiting ones
    included. A CALCULATED result nobody approved in 30 days goes with the rest, and the
    retention run says so with a warning naming how many, so the loss is not silent."""
    from workers.retention import purge_retention

    await create(api, definition("manual-10", "sum(deposit.amount) * 10%",
                                 approval_mode=pb.APPROVAL_MODE_MANUAL))
    await customers(api, ("m1", "EUR", "UTC"), ("m2", "EUR", "UTC"))
    await events(api, "dep", ("m1", "deposit", "250", clock.now() - timedelta(hours=1), {}))
    await request(api, "manual-10", ["m1", "m2"], "r1")
    clock.advance(timedelta(minutes=5))
    await run_due_batches(pool, settings, clock)
    found = {r.customer_id: r for r in await results(api)}
    assert found["m1"].status == pb.BONUS_STATUS_CALCULATED
    assert found["m2"].status == pb.BONUS_STATUS_SKIPPED
    sweep = {"pool": pool, "clock": clock, "settings": settings}
    clock.advance(timedelta(days=29))
    counts = await purge_retention(sweep)
    assert counts["bonus_results"] == 0
    assert len(await results(api)) == 2
    clock.advance(timedelta(days=1, minutes=1))
    with caplog.at_level("WARNING", logger="promo.retention"):
        counts = await purge_retention(sweep)
    assert (counts["bonus_results"], counts["bonus_requests"], counts["bonus_batches"]) == (
        2, 2, 1)
    assert await results(api) == []
    [warning] = [r for r in caplog.records if r.levelname == "WARNING"]
    assert warning.getMessage() == "purged bonus results that were still waiting for approval"
    assert warning.count == 1  # type: ignore[attr-defined]
    with pytest.raises(grpc.RpcError) as caught:
        await stub(api).ApproveBonusResults(pb.ApproveBonusResultsRequest(
            request_id="late-approval", bonus_ids=[found["m1"].bonus_id]), metadata=api.key())
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


# --- recalculation keeps the old transaction period ---------------------------------------------


async def test_recalculation_uses_the_edited_period(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """docs/bonuses.md: RecalculateBonusResults "computes every SKIPPED and CALCULATED result
    again with the current formula and settings", and a new period is a new revision. The
    recalculation reads the window stored with the request instead: widening the period from 1
    to 7 days changes nothing."""
    await create(api, definition("manual-10", "sum(deposit.amount) * 10%",
                                 approval_mode=pb.APPROVAL_MODE_MANUAL))
    await customers(api, ("m1", "EUR", "UTC"))
    await events(api, "dep", ("m1", "deposit", "100", clock.now() - timedelta(days=3), {}),
                 ("m1", "deposit", "50", clock.now() - timedelta(hours=1), {}))
    await request(api, "manual-10", ["m1"], "r1")
    clock.advance(timedelta(minutes=5))
    await run_due_batches(pool, settings, clock)
    [first] = await results(api)
    assert first.amount == "5"  # the last day only
    edited = await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
        request_id="week", definition=pb.BonusDefinition(
            definition_id="manual-10", period=fpb.TransactionPeriod(
                time_back=fpb.TransactionPeriod.TimeBack(amount=7, unit=fpb.TIME_UNIT_DAYS))),
        update_mask={"paths": ["period"]}), metadata=api.key())
    assert edited.definition.revision == 2
    await stub(api).RecalculateBonusResults(pb.RecalculateBonusResultsRequest(
        request_id="recalc", definition_id="manual-10"), metadata=api.key())
    [after] = await results(api)
    assert after.definition_revision == 2
    assert after.amount == "15"  # observed: "5", read over the request's old 1-day window


async def backend_waits_on_a_lock(pool: asyncpg.Pool, query_part: str) -> None:
    """Until some backend running a statement containing ``query_part`` waits on a lock."""
    async with pool.acquire() as conn:
        for _ in range(500):
            if await conn.fetchval(
                    """SELECT count(*) FROM pg_stat_activity
                        WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'""",
                    query_part):
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"no backend waits on a lock in {query_part!r}")


# --- a formula edit and a recalculation while a batch is computing -------------------------------


async def _done_or_waiting(task: asyncio.Future[object], pool: asyncpg.Pool,
                           query_part: str) -> None:
    """Until ``task`` finished or a backend running ``query_part`` waits on a lock."""
    async with pool.acquire() as conn:
        for _ in range(500):
            if task.done() or await conn.fetchval(
                    """SELECT count(*) FROM pg_stat_activity
                        WHERE wait_event_type = 'Lock' AND query LIKE '%' || $1 || '%'""",
                    query_part):
                return
            await asyncio.sleep(0.01)
    raise AssertionError(f"neither done nor waiting in {query_part!r}")


async def test_a_batch_in_flight_does_not_write_results_of_a_replaced_formula(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """The batch reads the definition once, unlocked, and writes its results later. An operator
    who edits the formula (10% -> 20%) and recalculates while the batch is computing gets
    "0 recalculated", then the batch writes a result of the old formula (revision 1) that no
    recalculation covered. (Held here by a row lock on the request, standing in for a long
    batch.)"""
    await manual_request_due(api, clock)
    async with pool.acquire() as blocker:
        transaction = blocker.transaction()
        await transaction.start()
        await blocker.execute("SELECT id FROM bonus_requests FOR UPDATE")
        batch = asyncio.create_task(run_due_batches(pool, settings, clock))
        await backend_waits_on_a_lock(pool, "SET status = 'DONE'")
        edit = asyncio.ensure_future(stub(api).UpdateBonusDefinition(
            pb.UpdateBonusDefinitionRequest(
                request_id="twenty", definition=pb.BonusDefinition(
                    definition_id="manual-10", formula="sum(deposit.amount) * 20%"),
                update_mask={"paths": ["formula"]}), metadata=api.key()))
        await _done_or_waiting(edit, pool, "bonus_definitions")
        recalc = None
        if edit.done():
            recalc = asyncio.ensure_future(stub(api).RecalculateBonusResults(
                pb.RecalculateBonusResultsRequest(request_id="recalc",
                                                  definition_id="manual-10"),
                metadata=api.key()))
            await _done_or_waiting(recalc, pool, "bonus_results")
        await transaction.rollback()
    assert await batch == 1
    await edit
    if recalc is None:  # the edit waited for the batch: recalculate now
        await stub(api).RecalculateBonusResults(pb.RecalculateBonusResultsRequest(
            request_id="recalc", definition_id="manual-10"), metadata=api.key())
    else:
        await recalc
    [result] = await results(api)
    # observed: revision 1, amount 25 (10%), after an edit to 20% and a recalculation
    assert (result.definition_revision, result.amount) == (2, "50")


# --- docs/operations.md: the bonus tables are not part of the hourly retention purge ------------


async def test_the_hourly_retention_purge_covers_the_bonus_tables_as_documented(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock) -> None:
    """docs/operations.md (Retention) lists bonus_results, finished bonus_requests and
    bonus_batches in the table of the hourly purge that "logs one line, `retention purge done`,
    with the rows deleted per table" and counts them in promo_retention_deleted_rows_total. The
    cron job (workers/retention.py) never touches them: a separate per-worker sweep hook
    (workers/bonuses.py purge_old_results) does, unlogged per table and uncounted."""
    from workers.retention import purge_retention

    await create(api, definition("deposit-10", "sum(deposit.amount) * 10%"))
    await customers(api, ("p1", "EUR", "UTC"))
    await events(api, "dep", ("p1", "deposit", "100", clock.now() - timedelta(hours=1), {}))
    await request(api, "deposit-10", ["p1"], "r1")
    clock.advance(timedelta(minutes=5))
    await run_due_batches(pool, settings, clock)
    clock.advance(timedelta(days=31))
    counts = await purge_retention({"pool": pool, "settings": settings, "clock": clock})
    # observed: no bonus table in the counts, and the 31-day-old result is still listed
    assert counts.get("bonus_results") == 1
    assert await results(api) == []




async def test_an_edit_committed_while_a_batch_computes_makes_it_compute_again(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The other interleaving: the operator's edit commits after the batch computed its results
    and before it writes them (injected at the batch's first write). The batch sees the new
    revision, drops what it computed and computes again: the results are the new formula's, and
    the approval mode switched to MANUAL in the same edit holds them in the queue (no ledger
    entry, no Issued event)."""
    from storage import bonuses as bonuses_repo

    await create(api, definition("auto-10", "sum(deposit.amount) * 10%"))
    await customers(api, ("a1", "EUR", "UTC"))
    await events(api, "dep", ("a1", "deposit", "250", clock.now() - timedelta(hours=1), {}))
    await request(api, "auto-10", ["a1"], "r1")
    clock.advance(timedelta(minutes=5))
    original = bonuses_repo._write_results
    edits = []

    async def edit_first(*args: object, **kwargs: object) -> object:
        if not edits:
            edits.append(await stub(api).UpdateBonusDefinition(
                pb.UpdateBonusDefinitionRequest(
                    request_id="twenty-manual", definition=pb.BonusDefinition(
                        definition_id="auto-10", formula="sum(deposit.amount) * 20%",
                        approval_mode=pb.APPROVAL_MODE_MANUAL),
                    update_mask={"paths": ["formula", "approval_mode"]}),
                metadata=api.key()))
        return await original(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(bonuses_repo, "_write_results", edit_first)
    assert await run_due_batches(pool, settings, clock) == 1
    assert edits[0].definition.revision == 2
    [result] = await results(api)
    assert (result.status, result.definition_revision, result.amount) == (
        pb.BONUS_STATUS_CALCULATED, 2, "50")
    assert await ledger(api, "a1") == []
