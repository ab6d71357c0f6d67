"""Regression tests for four dynamic-bonus defects found in review, each against the real stack
(server, PostgreSQL, the worker's schedule sweep) with a pinned clock:

- a rule edit and a recording of a customer's first counted events do not deadlock;
- a schedule whose run cannot be made is skipped and logged, and never blocks the others;
  one whose every run would read an empty period is refused when saved;
- an update of decimals to 0 takes effect;
- an empty definition_id (or rule, schedule, customer id) is INVALID_ARGUMENT MISSING_FIELD.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from datetime import UTC, datetime, timedelta

import asyncpg
import grpc
import pytest

from config.settings import Settings
from core.clock import FixedClock
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import formulas_pb2 as fpb
from promo.v1 import promotions_pb2 as ppb
from server.errors import error_info_of
from storage import bonus_triggers as triggers_repo
from tests.conftest import Api, rpc_error_reason
from tests.e2e.test_bonuses_api import (
    create,
    customers,
    definition,
    events,
    request,
    rule,
    stub,
)
from workers.bonuses import run_due_schedules


async def _done_or_waiting_on_a_lock(task: asyncio.Task[None], pool: asyncpg.Pool) -> None:
    """Until ``task`` finished or a backend of this test's database waits on a lock."""
    async with pool.acquire() as conn:
        for _ in range(1000):
            if task.done() or await conn.fetchval(
                    """SELECT count(*) FROM pg_stat_activity
                        WHERE wait_event_type = 'Lock' AND datname = current_database()"""):
                return
            await asyncio.sleep(0.01)
    raise AssertionError("the task neither finished nor waited on a lock")


def _schedule(schedule_id: str, definition_id: str, customer: str, local: str,
              time_zone: str = "UTC") -> pb.BonusSchedule:
    return pb.BonusSchedule(schedule_id=schedule_id, definition_id=definition_id,
                            customer_ids=[customer], local_time=local, time_zone=time_zone)


async def _create_schedule(api: Api, schedule: pb.BonusSchedule) -> pb.BonusSchedule:
    response = await stub(api).CreateBonusSchedule(pb.CreateBonusScheduleRequest(
        request_id=schedule.schedule_id, schedule=schedule), metadata=api.key())
    return response.schedule


async def _schedules(api: Api) -> dict[str, pb.BonusSchedule]:
    listed = await stub(api).ListBonusSchedules(pb.ListBonusSchedulesRequest(),
                                                metadata=api.key())
    return {s.schedule_id: s for s in listed.schedules}


def _extras(record: logging.LogRecord, *names: str) -> tuple[object, ...]:
    """The ``extra`` fields a log call gave."""
    return tuple(vars(record)[name] for name in names)


def _today_so_far(time_zone: str = "") -> fpb.TransactionPeriod:
    """Today so far, in ``time_zone`` (empty: each customer's own zone)."""
    return fpb.TransactionPeriod(relative=fpb.TransactionPeriod.Relative(
        kind=fpb.RELATIVE_KIND_TODAY_SO_FAR, time_zone=time_zone))


# --- a rule edit and a recording of a customer's first counted events ---------------------------


async def test_a_rule_edit_does_not_deadlock_with_a_customers_first_counted_events(
        api: Api, pool: asyncpg.Pool, clock: FixedClock) -> None:
    """UpdateBonusRule locks the rule's row, then takes the rule's advisory lock; RecordEvents
    takes the advisory lock (shared), then inserts the customer's first bonus_rule_states row,
    whose foreign key check needs KEY SHARE on the rule's row. The edit's row lock is FOR NO
    KEY UPDATE, which KEY SHARE does not wait for: a recording that comes between the edit's
    two steps is not blocked by the edit, both succeed, and the edit's reset of the counts
    comes after the recording (the bet counted under the old rule does not survive it)."""
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await rule(api, pb.BonusRule(rule_id="hundred", definition_id="bets-10", event_kind="bet",
                                 every=100))
    await customers(api, ("n1", "EUR", "UTC"))
    async with pool.acquire() as editor:
        transaction = editor.transaction()
        await transaction.start()
        # UpdateBonusRule's work(), step one: the rule's row lock.
        current = await triggers_repo.get_rule(editor, "hundred", for_update=True)
        recording = asyncio.create_task(events(
            api, "first-bets", ("n1", "bet", "1", clock.now() - timedelta(minutes=1), {})))
        await _done_or_waiting_on_a_lock(recording, pool)
        # Not blocked by the row lock (with FOR UPDATE it waited here, then deadlocked).
        recorded_before_the_edit = recording.done()
        # Step two: save the edit (every 100 -> 3) under the rule's advisory lock.
        edit_error: Exception | None = None
        try:
            await triggers_repo.update_rule(
                editor, current.pk, replace(current.rule, every=3),
                event_filter=current.event_filter,
                qualification_filter=current.qualification_filter, reset_counts=True)
        except asyncpg.PostgresError as exc:
            edit_error = exc
            await transaction.rollback()
        else:
            await transaction.commit()
    assert edit_error is None
    try:
        await recording
    except grpc.RpcError as exc:
        pytest.fail(f"RecordEvents failed: {exc.code()} {exc.details()}")
    assert recorded_before_the_edit
    async with pool.acquire() as conn:
        assert await conn.fetchval("SELECT count(*) FROM events WHERE customer_id = 'n1'") == 1
        state = await conn.fetchrow(
            """SELECT s.accumulated, s.first_event_at FROM bonus_rule_states s
                 JOIN bonus_rules r ON r.id = s.rule_pk
                WHERE r.rule_id = 'hundred' AND s.customer_id = 'n1'""")
        assert (state["accumulated"], state["first_event_at"]) == (0, None)  # reset by the edit
        assert await conn.fetchval(
            "SELECT every_n FROM bonus_rules WHERE rule_id = 'hundred'") == 3


# --- a schedule whose run cannot be made is skipped and does not block the others --------------


async def test_a_schedule_whose_period_is_empty_does_not_block_the_others(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """A daily 00:00 UTC run of a "today so far" definition for a customer in UTC resolves an
    empty period (start = end = midnight): that run is skipped, logged with the schedule, the
    definition and the reason (INVALID_PERIOD), and the schedule still advances (last run
    00:00, next run tomorrow), so it neither retries forever nor stops the sweep: the next
    due schedule (00:30, another definition) runs and makes its request."""
    await create(api, definition("today", "sum(bet.amount) * 10%", period=_today_so_far()))
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await customers(api, ("a1", "EUR", "UTC"), ("b1", "EUR", "UTC"))
    await _create_schedule(api, _schedule("midnight", "today", "a1", "00:00"))
    await _create_schedule(api, _schedule("half-past", "bets-10", "b1", "00:30"))
    clock.set(datetime(2026, 11, 23, 0, 31, tzinfo=UTC))
    sweep = {"pool": pool, "clock": clock, "settings": settings}
    with caplog.at_level(logging.WARNING, logger="promo.bonuses"):
        await run_due_schedules(sweep)
    listed = await _schedules(api)
    assert {s.schedule_id: (s.last_run_time.ToDatetime(UTC), s.next_run_time.ToDatetime(UTC))
            for s in listed.values()} == {
        "midnight": (datetime(2026, 11, 23, 0, 0, tzinfo=UTC),
                     datetime(2026, 11, 24, 0, 0, tzinfo=UTC)),
        "half-past": (datetime(2026, 11, 23, 0, 30, tzinfo=UTC),
                      datetime(2026, 11, 24, 0, 30, tzinfo=UTC))}
    async with pool.acquire() as conn:
        made = await conn.fetch("SELECT customer_id, source FROM bonus_requests ORDER BY id")
    assert [(r["customer_id"], r["source"]) for r in made] == [("b1", "schedule:half-past")]
    [logged] = [r for r in caplog.records if r.name == "promo.bonuses"]
    assert (logged.levelno, logged.getMessage()) == (
        logging.WARNING, "bonus schedule run skipped: the today_so_far period in UTC is empty "
        "at 2026-11-23T00:00:00+00:00")
    assert _extras(logged, "schedule_id", "definition_id", "run_time", "reason") == (
        "midnight", "today", "2026-11-23T00:00:00+00:00", "INVALID_PERIOD")


async def test_a_schedule_failing_on_a_database_error_stays_due_and_the_others_run(
        api: Api, pool: asyncpg.Pool, settings: Settings, clock: FixedClock,
        caplog: pytest.LogCaptureFixture) -> None:
    """A run that fails on an unexpected database error is logged (ERROR, with the schedule
    and definition) and left due: not advanced, retried on the next sweep, and it stops no
    other schedule; once the cause is gone the next sweep makes it."""
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await customers(api, ("a1", "EUR", "UTC"), ("b1", "EUR", "UTC"))
    await _create_schedule(api, _schedule("first", "bets-10", "a1", "00:00"))
    await _create_schedule(api, _schedule("second", "bets-10", "b1", "00:30"))
    async with pool.acquire() as conn:  # a1's requests fail in the database
        await conn.execute(
            """CREATE FUNCTION refuse_a1() RETURNS trigger LANGUAGE plpgsql AS $$
               BEGIN RAISE EXCEPTION 'refused for the test'; END $$;
               CREATE TRIGGER refuse_a1 BEFORE INSERT ON bonus_requests FOR EACH ROW
                WHEN (NEW.customer_id = 'a1') EXECUTE FUNCTION refuse_a1();""")
    clock.set(datetime(2026, 11, 23, 0, 31, tzinfo=UTC))
    sweep = {"pool": pool, "clock": clock, "settings": settings}
    with caplog.at_level(logging.WARNING, logger="promo.bonuses"):
        await run_due_schedules(sweep)
    listed = await _schedules(api)
    assert not listed["first"].HasField("last_run_time")
    assert listed["first"].next_run_time.ToDatetime(UTC) == datetime(2026, 11, 23, tzinfo=UTC)
    assert listed["second"].last_run_time.ToDatetime(UTC) == datetime(2026, 11, 23, 0, 30,
                                                                     tzinfo=UTC)
    [logged] = [r for r in caplog.records if r.name == "promo.bonuses"]
    assert (logged.levelno, logged.getMessage(), *_extras(logged, "schedule_id",
                                                          "definition_id")) == (
        logging.ERROR, "bonus schedule run failed; retried on the next sweep", "first",
        "bets-10")
    assert logged.exc_info is not None and isinstance(logged.exc_info[1], asyncpg.RaiseError)
    async with pool.acquire() as conn:
        await conn.execute("DROP TRIGGER refuse_a1 ON bonus_requests")
    await run_due_schedules(sweep)
    listed = await _schedules(api)
    assert listed["first"].last_run_time.ToDatetime(UTC) == datetime(2026, 11, 23, tzinfo=UTC)
    async with pool.acquire() as conn:
        made = await conn.fetch("SELECT customer_id FROM bonus_requests ORDER BY customer_id")
    assert [r["customer_id"] for r in made] == ["a1", "b1"]


async def test_a_schedule_whose_every_run_reads_an_empty_period_is_refused(api: Api) -> None:
    """A schedule at 00:00 in the zone of its definition's "today so far" period would read
    nothing on every run: CreateBonusSchedule and UpdateBonusSchedule refuse it with
    INVALID_ARGUMENT INVALID_PERIOD on local_time. A later time, another zone or a period in
    each customer's zone is accepted (there only some runs can be empty; those are skipped),
    and such a schedule can still be paused."""
    await create(api, definition("today-utc", "sum(bet.amount) * 10%",
                                 period=_today_so_far("UTC")))
    await customers(api, ("a1", "EUR", "UTC"))
    with pytest.raises(grpc.RpcError) as caught:
        await _create_schedule(api, _schedule("midnight", "today-utc", "a1", "00:00"))
    info = error_info_of(caught.value)
    assert (caught.value.code(), caught.value.details(), info and info.reason,
            info and info.metadata["field"]) == (
        grpc.StatusCode.INVALID_ARGUMENT,
        "local_time: definition 'today-utc' reads today so far in UTC, which is empty at "
        "00:00 there: every run would read nothing; run later in the day (or read the last "
        "full day)", "INVALID_PERIOD", "local_time")
    await _create_schedule(api, _schedule("evening", "today-utc", "a1", "23:00"))
    await _create_schedule(api, _schedule("berlin", "today-utc", "a1", "00:00",
                                          "Europe/Berlin"))
    await create(api, definition("today", "sum(bet.amount) * 10%", period=_today_so_far()))
    await _create_schedule(api, _schedule("customers-zone", "today", "a1", "00:00"))
    with pytest.raises(grpc.RpcError) as caught:
        await stub(api).UpdateBonusSchedule(pb.UpdateBonusScheduleRequest(
            request_id="to-midnight", schedule=pb.BonusSchedule(
                schedule_id="evening", local_time="00:00"),
            update_mask={"paths": ["local_time"]}), metadata=api.key())
    assert (caught.value.code(), rpc_error_reason(caught.value)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PERIOD")
    paused = await stub(api).UpdateBonusSchedule(pb.UpdateBonusScheduleRequest(
        request_id="pause-midnight", schedule=pb.BonusSchedule(
            schedule_id="evening", local_time="00:00", active=False),
        update_mask={"paths": ["local_time", "active"]}), metadata=api.key())
    assert (paused.schedule.local_time, paused.schedule.active) == ("00:00", False)


async def test_midnight_in_another_name_of_the_periods_zone_is_refused_too(api: Api) -> None:
    """Etc/UTC is UTC under another name: its 00:00 runs read nothing either. Compared by name
    such a schedule used to be accepted and every one of its runs skipped (logged)."""
    await create(api, definition("today-utc", "sum(bet.amount) * 10%",
                                 period=_today_so_far("UTC")))
    await customers(api, ("a1", "EUR", "UTC"))
    with pytest.raises(grpc.RpcError) as caught:
        await _create_schedule(api, _schedule("alias", "today-utc", "a1", "00:00", "Etc/UTC"))
    assert (caught.value.code(), rpc_error_reason(caught.value)) == (
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_PERIOD")
    assert caught.value.details() == (
        "local_time: definition 'today-utc' reads today so far in UTC (the schedule's Etc/UTC "
        "keeps the same clock), which is empty at 00:00 there: every run would read nothing; "
        "run later in the day (or read the last full day)")
    await _create_schedule(api, _schedule("alias-later", "today-utc", "a1", "00:30", "Etc/UTC"))


# --- an update of decimals to 0 ----------------------------------------------------------------


async def test_updating_decimals_to_zero_takes_effect(api: Api) -> None:
    """Seed 004: "If you setup the value to 0 there will be no decimals after the number." An
    UpdateBonusDefinition with mask ["decimals"] and decimals 0 sets 0 (a new revision), even
    though the message's own rounding is unset; only a create without rounding turns an unset
    decimals into 2."""
    created = await create(api, definition("round-2", "sum(deposit.amount) * 10%",
                                           rounding=ppb.ROUNDING_MODE_ROUND, decimals=2))
    assert created.decimals == 2
    updated = await stub(api).UpdateBonusDefinition(pb.UpdateBonusDefinitionRequest(
        request_id="zero", definition=pb.BonusDefinition(definition_id="round-2", decimals=0),
        update_mask={"paths": ["decimals"]}), metadata=api.key())
    assert (updated.definition.decimals, updated.definition.revision,
            updated.definition.rounding) == (0, 2, ppb.ROUNDING_MODE_ROUND)
    got = await stub(api).GetBonusDefinition(pb.GetBonusDefinitionRequest(
        definition_id="round-2"), metadata=api.key())
    assert got.definition.decimals == 0
    unrounded = await create(api, definition("no-rounding", "sum(deposit.amount) * 10%"))
    assert unrounded.decimals == 2


# --- bad input: a missing id is INVALID_ARGUMENT MISSING_FIELD ---------------------------------


async def test_a_missing_definition_id_is_invalid_argument(api: Api) -> None:
    """Design invariant 4: bad input is INVALID_ARGUMENT with a reason. Every BonusService
    call that names a definition (or a rule, a schedule, a customer) answers an empty id with
    INVALID_ARGUMENT MISSING_FIELD naming the field, not NOT_FOUND "no bonus definition ''";
    in list filters an empty definition_id still means "all"."""
    await create(api, definition("bets-10", "sum(bet.amount) * 10%"))
    await customers(api, ("c1", "EUR", "UTC"))
    await rule(api, pb.BonusRule(rule_id="each", definition_id="bets-10", event_kind="bet",
                                 every=1))
    await _create_schedule(api, _schedule("daily", "bets-10", "c1", "12:00"))
    s = stub(api)
    calls = {
        "GetBonusDefinition": ("definition_id", lambda: s.GetBonusDefinition(
            pb.GetBonusDefinitionRequest(), metadata=api.key())),
        "CreateBonusDefinition": ("definition_id", lambda: create(
            api, definition("", "sum(bet.amount)"))),
        "UpdateBonusDefinition": ("definition_id", lambda: s.UpdateBonusDefinition(
            pb.UpdateBonusDefinitionRequest(
                request_id="no-definition", definition=pb.BonusDefinition(decimals=1),
                update_mask={"paths": ["decimals"]}), metadata=api.key())),
        "RequestBonusCalculation": ("definition_id", lambda: request(
            api, "", ["c1"], "no-definition")),
        "RecalculateBonusResults": ("definition_id", lambda: s.RecalculateBonusResults(
            pb.RecalculateBonusResultsRequest(request_id="no-definition"), metadata=api.key())),
        "CreateBonusRule": ("definition_id", lambda: rule(api, pb.BonusRule(
            rule_id="no-definition", event_kind="bet", every=1))),
        "UpdateBonusRule definition_id": ("definition_id", lambda: s.UpdateBonusRule(
            pb.UpdateBonusRuleRequest(request_id="clear-definition",
                                      rule=pb.BonusRule(rule_id="each"),
                                      update_mask={"paths": ["definition_id"]}),
            metadata=api.key())),
        "CreateBonusSchedule": ("definition_id", lambda: _create_schedule(
            api, _schedule("no-definition", "", "c1", "12:00"))),
        "UpdateBonusSchedule definition_id": ("definition_id", lambda: s.UpdateBonusSchedule(
            pb.UpdateBonusScheduleRequest(request_id="clear-schedule-definition",
                                          schedule=pb.BonusSchedule(schedule_id="daily"),
                                          update_mask={"paths": ["definition_id"]}),
            metadata=api.key())),
        "GetBonusRule": ("rule_id", lambda: s.GetBonusRule(pb.GetBonusRuleRequest(),
                                                           metadata=api.key())),
        "UpdateBonusRule": ("rule_id", lambda: s.UpdateBonusRule(pb.UpdateBonusRuleRequest(
            request_id="no-rule", rule=pb.BonusRule(every=2),
            update_mask={"paths": ["every"]}), metadata=api.key())),
        "UpdateBonusSchedule": ("schedule_id", lambda: s.UpdateBonusSchedule(
            pb.UpdateBonusScheduleRequest(request_id="no-schedule",
                                          schedule=pb.BonusSchedule(local_time="13:00"),
                                          update_mask={"paths": ["local_time"]}),
            metadata=api.key())),
        "ListCustomerBonusLedger": ("customer_id", lambda: s.ListCustomerBonusLedger(
            pb.ListCustomerBonusLedgerRequest(), metadata=api.key())),
    }
    for name, (field, call) in calls.items():
        with pytest.raises(grpc.RpcError) as caught:
            await call()
        info = error_info_of(caught.value)
        assert (caught.value.code(), caught.value.details(), info and info.reason,
                info and info.metadata["field"]) == (
            grpc.StatusCode.INVALID_ARGUMENT, f"{field} is required", "MISSING_FIELD",
            field), name
    # List filters: empty means all.
    await s.ListBonusResults(pb.ListBonusResultsRequest(), metadata=api.key())
    await s.ListBonusBatches(pb.ListBonusBatchesRequest(), metadata=api.key())
