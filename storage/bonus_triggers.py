"""Dynamic-bonus triggers in PostgreSQL: automation rules counting events as they are recorded,
and schedules turned into requests by a worker sweep (seed 004's triggers).

Both only make requests (storage.bonuses.add_requests); the batch computes them.

An edit of a rule takes an exclusive advisory lock on it (_RULE_LOCK_CLASS, rule pk) and the
event recording a shared one before it reads the rule again: a recording that began under the
old rule finishes before the edit resets counts, one that began after counts under the new
rule, so no count made under an old condition survives its reset.

Lock order, and why it cannot deadlock: an edit (UpdateBonusRule, which also pauses and resumes;
there is no rule deletion) locks the rule's row, then takes the advisory lock. A recording takes
the advisory lock (shared), then inserts bonus_rule_states rows, whose foreign key check takes
KEY SHARE on the rule's row. The edit's row lock is FOR NO KEY UPDATE (it never changes the
row's keys), which KEY SHARE does not wait for; so a recording holding the advisory lock never
waits for an edit, and the edit only waits for it to commit. (FOR UPDATE would conflict with
KEY SHARE and close the cycle.)

A scheduled run that cannot be made (the definition's period is empty at the run time for
every customer, a customer is gone) is logged and skipped: the schedule moves on to its next
run, so one bad schedule neither blocks the others nor retries forever. Customers whose period
alone is empty (a period in each customer's zone) are left out of the run, logged; the others
are computed.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

import asyncpg

from core.bonuses.definitions import DataMode
from core.bonuses.rules import (
    PeriodMode,
    Qualification,
    Rule,
    RuleState,
    Schedule,
    apply_event,
    check_rule_period_fits,
    compile_filter,
    next_run,
    rule_request_key,
    schedule_request_key,
)
from core.bonuses.schedule_periods import check_schedule_period
from core.customers import typed_attributes
from core.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from core.formula.memory import EventRecord
from storage.bonuses import (
    Accepted,
    DefinitionRow,
    EmptyPeriods,
    NewRequest,
    add_requests,
    get_definition,
    known_customers,
)

log = logging.getLogger("promo.bonuses")

# --- triggers: automation rules -------------------------------------------------------------

_RULE_LOCK_CLASS = 7010  # advisory lock namespace: (7010, rule pk)


@dataclass(frozen=True)
class RuleRow:
    pk: int
    rule: Rule
    event_filter: str
    qualification_filter: str
    create_time: datetime


def _rule(row: asyncpg.Record) -> RuleRow:
    qualification = None
    if row["qualification_kind"] is not None:
        qualification = Qualification(
            kind=row["qualification_kind"], min_amount=row["qualification_min"],
            filters=compile_filter(row["qualification_kind"], row["qualification_filter"],
                                   field="qualification.filter"),
            currency=row["qualification_currency"])
    rule = Rule(rule_id=row["rule_id"], definition_id=row["definition_id"],
                event_kind=row["event_kind"], every=row["every_n"],
                filters=compile_filter(row["event_kind"], row["event_filter"], field="filter"),
                qualification=qualification, max_executions=row["max_executions"],
                period_mode=PeriodMode(row["period_mode"]), period_end=row["period_end"],
                active=row["active"])
    return RuleRow(pk=row["id"], rule=rule, event_filter=row["event_filter"],
                   qualification_filter=row["qualification_filter"],
                   create_time=row["create_time"])


_RULE_SELECT = """SELECT r.*, d.definition_id FROM bonus_rules r
                    JOIN bonus_definitions d ON d.id = r.definition_pk"""


def _reads_transactions(definition: DefinitionRow) -> bool:
    return definition.definition.data_mode is not DataMode.PROPERTIES_ONLY


async def insert_rule(conn: asyncpg.Connection, rule: Rule, *, event_filter: str,
                      qualification_filter: str, now: datetime) -> RuleRow:
    definition = await get_definition(conn, rule.definition_id)
    check_rule_period_fits(rule, reads_transactions=_reads_transactions(definition))
    q = rule.qualification
    pk = await conn.fetchval(
        """INSERT INTO bonus_rules (rule_id, definition_pk, event_kind, event_filter, every_n,
                                    qualification_kind, qualification_min, qualification_filter,
                                    max_executions, period_mode, period_end, active,
                                    create_time, qualification_currency)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)
           ON CONFLICT (rule_id) DO NOTHING RETURNING id""",
        rule.rule_id, definition.pk, rule.event_kind, event_filter, rule.every,
        q.kind if q else None, q.min_amount if q else None, qualification_filter,
        rule.max_executions, rule.period_mode.value, rule.period_end, rule.active, now,
        q.currency if q else None)
    if pk is None:
        raise AlreadyExists(f"bonus rule {rule.rule_id!r} already exists",
                            reason="BONUS_RULE_EXISTS", metadata={"rule_id": rule.rule_id})
    return await get_rule(conn, rule.rule_id)


async def get_rule(conn: asyncpg.Connection, rule_id: str, *,
                   for_update: bool = False) -> RuleRow:
    """The rule; ``for_update`` locks its row against other edits (FOR NO KEY UPDATE, so event
    recordings inserting states that reference it are not blocked: see the module doc)."""
    lock = " FOR NO KEY UPDATE OF r" if for_update else ""
    row = await conn.fetchrow(f"{_RULE_SELECT} WHERE r.rule_id = $1{lock}", rule_id)
    if row is None:
        raise NotFound(f"no bonus rule {rule_id!r}", reason="BONUS_RULE_NOT_FOUND",
                       metadata={"rule_id": rule_id})
    return _rule(row)


async def update_rule(conn: asyncpg.Connection, pk: int, rule: Rule, *, event_filter: str,
                      qualification_filter: str, reset_counts: bool) -> RuleRow:
    """Save an edited rule (the caller holds its row lock). With ``reset_counts`` (a new
    counting condition) every customer's count starts again; qualifications, executions since
    them and the firing numbers (the keys of the requests already made) are kept."""
    definition = await get_definition(conn, rule.definition_id)
    check_rule_period_fits(rule, reads_transactions=_reads_transactions(definition))
    await conn.execute("SELECT pg_advisory_xact_lock($1, $2::int)", _RULE_LOCK_CLASS, pk)
    q = rule.qualification
    await conn.execute(
        """UPDATE bonus_rules
              SET definition_pk = $2, event_kind = $3, event_filter = $4, every_n = $5,
                  qualification_kind = $6, qualification_min = $7, qualification_filter = $8,
                  max_executions = $9, period_mode = $10, period_end = $11, active = $12,
                  qualification_currency = $13
            WHERE id = $1""",
        pk, definition.pk, rule.event_kind, event_filter, rule.every, q.kind if q else None,
        q.min_amount if q else None, qualification_filter, rule.max_executions,
        rule.period_mode.value, rule.period_end, rule.active, q.currency if q else None)
    if reset_counts:
        await conn.execute(
            """UPDATE bonus_rule_states
                  SET accumulated = 0, first_event_at = NULL, last_event_at = NULL
                WHERE rule_pk = $1 AND accumulated > 0""", pk)
    return await get_rule(conn, rule.rule_id)


async def list_rules(conn: asyncpg.Connection, *, after_id: str | None,
                     limit: int) -> list[RuleRow]:
    rows = await conn.fetch(
        f"""{_RULE_SELECT} WHERE $1::text IS NULL OR r.rule_id > $1
             ORDER BY r.rule_id LIMIT $2""", after_id, limit)
    return [_rule(row) for row in rows]


def _state(row: asyncpg.Record) -> RuleState:
    return RuleState(accumulated=row["accumulated"], first_event_at=row["first_event_at"],
                     last_event_at=row["last_event_at"], qualified_at=row["qualified_at"],
                     executions=row["executions"], fired=row["fired"])


async def on_events_recorded(conn: asyncpg.Connection, kinds: Iterable[str],
                             external_ids: Sequence[str], *, now: datetime,
                             default_window: int) -> list[tuple[int, datetime]]:
    """Run the automation rules over the events this transaction just inserted (a retried
    event, already stored, is not counted again). Called by RecordEvents inside its
    transaction; returns the batch jobs to queue after commit."""
    kinds = sorted(set(kinds))
    matching = """r.active AND (r.event_kind = ANY($1::text[])
                                 OR r.qualification_kind = ANY($1::text[]))"""
    locked = [r["id"] for r in await conn.fetch(
        f"""SELECT r.id, pg_advisory_xact_lock_shared({_RULE_LOCK_CLASS}, r.id::int)
              FROM bonus_rules r WHERE {matching} ORDER BY r.id""", kinds)]
    if not locked:
        return []
    # Read again under the locks: an edit that committed meanwhile is seen (see the module doc).
    rule_rows = [_rule(r) for r in await conn.fetch(
        f"{_RULE_SELECT} WHERE r.id = ANY($2::bigint[]) AND {matching} ORDER BY r.id",
        kinds, locked)]
    if not rule_rows:
        return []
    relevant = sorted({r.rule.event_kind for r in rule_rows} | {
        r.rule.qualification.kind for r in rule_rows if r.rule.qualification is not None})
    # xmin = this transaction: only the rows this call inserted, not duplicates it skipped.
    rows = await conn.fetch(
        """SELECT id, customer_id, kind, amount, currency, occurred_at, attributes::text AS a
             FROM events
            WHERE external_id = ANY($1::text[]) AND kind = ANY($2::text[])
              AND xmin = pg_current_xact_id()::xid
            ORDER BY customer_id, occurred_at, id""", list(external_ids), relevant)
    by_customer: dict[str, list[EventRecord]] = {}
    for r in rows:
        by_customer.setdefault(r["customer_id"], []).append(EventRecord(
            event_id=r["id"], kind=r["kind"], amount=r["amount"], currency=r["currency"],
            occurred_at=r["occurred_at"], attributes=typed_attributes(json.loads(r["a"]))))
    if not by_customer:
        return []
    jobs: list[tuple[int, datetime]] = []
    definitions: dict[str, DefinitionRow] = {}

    async def definition_of(rule: Rule) -> DefinitionRow:
        if rule.definition_id not in definitions:
            definitions[rule.definition_id] = await get_definition(conn, rule.definition_id)
        return definitions[rule.definition_id]

    # A minimum amount without a currency of its own is in each customer's currency.
    currencies: dict[str, str | None] = {}
    if any(r.rule.qualification is not None and r.rule.qualification.currency is None
           and r.rule.qualification.min_amount is not None for r in rule_rows):
        currencies = {c: k.currency for c, k in (await known_customers(
            conn, by_customer, properties=False)).items()}
    for rule_row in rule_rows:
        rule = rule_row.rule
        # A DEFINITION-mode rule stops counting at the end of its definition's fixed dates.
        period = ((await definition_of(rule)).definition.period
                  if rule.period_mode is PeriodMode.DEFINITION else None)
        customers = sorted(by_customer)
        await conn.execute(
            """INSERT INTO bonus_rule_states (rule_pk, customer_id)
               SELECT $1, unnest($2::text[]) ORDER BY 2 ON CONFLICT DO NOTHING""",
            rule_row.pk, customers)
        states = {r["customer_id"]: _state(r) for r in await conn.fetch(
                """SELECT * FROM bonus_rule_states WHERE rule_pk = $1
                      AND customer_id = ANY($2::text[]) ORDER BY customer_id FOR UPDATE""",
                rule_row.pk, customers)}
        requests: list[NewRequest] = []
        for customer_id in customers:
            state = states[customer_id]
            for event in by_customer[customer_id]:
                state, firing = apply_event(rule, state, event,
                                            customer_currency=currencies.get(customer_id),
                                            definition_period=period)
                if firing is not None:
                    requests.append(NewRequest(
                        customer_id, rule_request_key(rule.rule_id, firing.number, customer_id),
                        firing.period))
            await conn.execute(
                """UPDATE bonus_rule_states
                      SET accumulated = $3, first_event_at = $4, last_event_at = $5,
                          qualified_at = $6, executions = $7, fired = $8
                    WHERE rule_pk = $1 AND customer_id = $2""",
                rule_row.pk, customer_id, state.accumulated, state.first_event_at,
                state.last_event_at, state.qualified_at, state.executions, state.fired)
        if requests:
            # An empty period (a firing at the customer's midnight under "today so far")
            # becomes that request's SKIPPED result: recording the events must not fail.
            accepted = await add_requests(conn, await definition_of(rule), requests,
                                          now=now, default_window=default_window,
                                          source=f"rule:{rule.rule_id}",
                                          empty_periods=EmptyPeriods.SKIP)
            if accepted.outbox_job_id is not None:
                jobs.append((accepted.outbox_job_id, accepted.due_at))
    return jobs


# --- triggers: schedules ----------------------------------------------------------------------


@dataclass(frozen=True)
class ScheduleRow:
    pk: int
    schedule: Schedule
    next_run_at: datetime
    last_run_at: datetime | None


def _schedule(row: asyncpg.Record) -> ScheduleRow:
    return ScheduleRow(pk=row["id"], schedule=Schedule(
        schedule_id=row["schedule_id"], definition_id=row["definition_id"],
        customer_ids=tuple(row["customer_ids"]), weekday=row["weekday"],
        local_time=row["local_time"], time_zone=row["time_zone"], active=row["active"],
        campaign_id=row["campaign_id"],
        since_campaign_entrance=row["since_campaign_entrance"]),
        next_run_at=row["next_run_at"], last_run_at=row["last_run_at"])


_SCHEDULE_SELECT = """SELECT s.*, d.definition_id, c.campaign_id FROM bonus_schedules s
                        JOIN bonus_definitions d ON d.id = s.definition_pk
                        LEFT JOIN campaigns c ON c.id = s.campaign_pk"""


async def _campaign_customers(conn: asyncpg.Connection, campaign_pk: int) -> list[str]:
    """A campaign's target group as it stands: every target of an unconditional campaign, the
    approved ones of a conditional campaign; customers not known here are left out. A
    cancelled campaign has nobody (it never runs)."""
    rows = await conn.fetch(
        """SELECT t.customer_id FROM campaign_targets t
             JOIN campaigns c ON c.id = t.campaign_id
            WHERE t.campaign_id = $1 AND c.status <> 'CANCELLED'
              AND (NOT c.conditional OR t.approved)
              AND EXISTS (SELECT 1 FROM customers k WHERE k.customer_id = t.customer_id)
            ORDER BY t.customer_id""", campaign_pk)
    return [r["customer_id"] for r in rows]


async def _schedule_references(conn: asyncpg.Connection, schedule: Schedule, *,
                               now: datetime, check_customers: bool = True,
                               refuse_cancelled: bool = True) -> tuple[int, int | None]:
    """The definition's and the campaign's pks; every one the schedule names must exist (the
    listed customers too, unless they were checked before: up to 100,000 of them), and the
    definition's period must not be empty at every run."""
    definition = await get_definition(conn, schedule.definition_id)
    check_schedule_period(schedule, definition.definition.period, now=now,
                          reads_transactions=_reads_transactions(definition))
    campaign_pk = None
    if schedule.campaign_id:
        campaign = await conn.fetchrow("SELECT id, status FROM campaigns WHERE campaign_id = $1",
                                       schedule.campaign_id)
        if campaign is None:
            raise NotFound(f"no campaign {schedule.campaign_id!r}", reason="CAMPAIGN_NOT_FOUND",
                           metadata={"campaign_id": schedule.campaign_id})
        if refuse_cancelled and campaign["status"] == "CANCELLED":
            # A cancelled campaign never runs and has nobody in it (_campaign_customers).
            raise FailedPrecondition(
                f"campaign {schedule.campaign_id} is CANCELLED: its target group will never "
                "get it; name another campaign or list the customers",
                reason="CAMPAIGN_CANCELLED",
                metadata={"campaign_id": schedule.campaign_id, "status": "CANCELLED"})
        campaign_pk = campaign["id"]
    unknown = sorted(set(schedule.customer_ids) - (await known_customers(
        conn, schedule.customer_ids, properties=False)).keys()) if check_customers else []
    if unknown:
        raise NotFound(f"unknown customers: {', '.join(repr(c) for c in unknown[:10])}",
                       reason="CUSTOMER_NOT_FOUND", metadata={"customer_id": unknown[0]})
    return definition.pk, campaign_pk


async def insert_schedule(conn: asyncpg.Connection, schedule: Schedule, *,
                          now: datetime) -> ScheduleRow:
    definition_pk, campaign_pk = await _schedule_references(conn, schedule, now=now)
    pk = await conn.fetchval(
        """INSERT INTO bonus_schedules (schedule_id, definition_pk, customer_ids, weekday,
                                        local_time, time_zone, next_run_at, active, create_time,
                                        campaign_pk, since_campaign_entrance)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)
           ON CONFLICT (schedule_id) DO NOTHING RETURNING id""",
        schedule.schedule_id, definition_pk, list(schedule.customer_ids), schedule.weekday,
        schedule.local_time, schedule.time_zone, next_run(schedule, now), schedule.active, now,
        campaign_pk, schedule.since_campaign_entrance)
    if pk is None:
        raise AlreadyExists(f"bonus schedule {schedule.schedule_id!r} already exists",
                            reason="BONUS_SCHEDULE_EXISTS",
                            metadata={"schedule_id": schedule.schedule_id})
    row = await conn.fetchrow(f"{_SCHEDULE_SELECT} WHERE s.id = $1", pk)
    return _schedule(row)


async def get_schedule(conn: asyncpg.Connection, schedule_id: str, *,
                       for_update: bool = False) -> ScheduleRow:
    lock = " FOR UPDATE OF s" if for_update else ""
    row = await conn.fetchrow(f"{_SCHEDULE_SELECT} WHERE s.schedule_id = $1{lock}",
                              schedule_id)
    if row is None:
        raise NotFound(f"no bonus schedule {schedule_id!r}", reason="BONUS_SCHEDULE_NOT_FOUND",
                       metadata={"schedule_id": schedule_id})
    return _schedule(row)


async def update_schedule(conn: asyncpg.Connection, current: ScheduleRow, schedule: Schedule,
                          *, retime: bool, now: datetime) -> ScheduleRow:
    """Save an edited schedule (the caller holds its row lock). The next run is computed again
    from ``now`` when ``retime`` (a new weekday, time or zone) or when the schedule is resumed
    (runs missed while paused are not made up); otherwise it stays. Customers, campaign and
    definition apply from the next run."""
    definition_pk, campaign_pk = await _schedule_references(
        conn, schedule, now=now,
        check_customers=schedule.customer_ids != current.schedule.customer_ids,
        # Only naming a cancelled campaign is refused: a schedule whose campaign was cancelled
        # later can still be paused or edited otherwise (it requests nobody meanwhile).
        refuse_cancelled=schedule.campaign_id != current.schedule.campaign_id)
    next_at = current.next_run_at
    if retime or (schedule.active and not current.schedule.active):
        next_at = next_run(schedule, now)
    await conn.execute(
        """UPDATE bonus_schedules
              SET definition_pk = $2, customer_ids = $3, weekday = $4, local_time = $5,
                  time_zone = $6, next_run_at = $7, active = $8, campaign_pk = $9,
                  since_campaign_entrance = $10
            WHERE id = $1""",
        current.pk, definition_pk, list(schedule.customer_ids), schedule.weekday,
        schedule.local_time, schedule.time_zone, next_at, schedule.active, campaign_pk,
        schedule.since_campaign_entrance)
    updated = await conn.fetchrow(f"{_SCHEDULE_SELECT} WHERE s.id = $1", current.pk)
    return _schedule(updated)


async def list_schedules(conn: asyncpg.Connection, *, after_id: str | None,
                         limit: int) -> list[ScheduleRow]:
    rows = await conn.fetch(
        f"""{_SCHEDULE_SELECT} WHERE $1::text IS NULL OR s.schedule_id > $1
             ORDER BY s.schedule_id LIMIT $2""", after_id, limit)
    return [_schedule(row) for row in rows]


# A run that fails with one of these cannot succeed by retrying it: it is skipped (logged) and
# the schedule moves on. Anything else (a database error, a bug) leaves the run due.
_SKIPPED_RUN_ERRORS = (InvalidArgument, FailedPrecondition, NotFound)


CATCH_UP = timedelta(days=31)
"""How far back missed schedule runs are still made (the longest transaction period)."""


async def run_due_schedules(pool: asyncpg.Pool, *, now: datetime,
                            default_window: int) -> list[tuple[int, datetime]]:
    """Turn every due run of every schedule into requests (one transaction per run, SKIP
    LOCKED so several workers share the work). Runs missed while no worker was up are each
    made, late, oldest first (nothing lost: each covers its own period, e.g. each day's
    "yesterday"), as far back as CATCH_UP (the longest period; older ones are skipped,
    logged). Requests are made as of the scheduled time, so periods like "last weekend"
    resolve the same whenever the run happens. Returns the batch jobs to queue.

    One schedule's failure never stops the others. A run refused by the domain (e.g. the
    definition's TODAY_SO_FAR period is empty at a 00:00 run) is logged and skipped: the
    schedule still advances (``last_run_at`` is the skipped run), or it would fail again on
    every sweep. Any other error is logged and leaves the schedule due (retried on the next
    sweep); the sweep goes on with the other schedules."""
    jobs: list[tuple[int, datetime]] = []
    failed: list[int] = []  # left due after an unexpected error: not retried in this sweep
    async with pool.acquire() as conn:
        while True:
            async with conn.transaction():
                row = await conn.fetchrow(
                    f"""{_SCHEDULE_SELECT} WHERE s.active AND s.next_run_at <= $1
                          AND s.id <> ALL($2::bigint[])
                         ORDER BY s.next_run_at LIMIT 1 FOR UPDATE OF s SKIP LOCKED""",
                    now, failed)
                if row is None:
                    return jobs
                due = _schedule(row)
                run_at = due.next_run_at
                context = {"schedule_id": due.schedule.schedule_id,
                           "definition_id": due.schedule.definition_id,
                           "run_time": run_at.isoformat()}
                if run_at <= now - CATCH_UP:  # down for longer: resume 31 days back
                    resume = next_run(due.schedule, now - CATCH_UP)
                    log.warning("bonus schedule runs older than %s days skipped",
                                CATCH_UP.days, extra={**context,
                                                      "next_run_time": resume.isoformat()})
                    await conn.execute("UPDATE bonus_schedules SET next_run_at = $2 WHERE id = $1",
                                       due.pk, resume)
                    continue
                try:
                    async with conn.transaction():  # a savepoint: a failed run leaves nothing
                        accepted = await _run_schedule(conn, row, due, default_window)
                except _SKIPPED_RUN_ERRORS as exc:
                    log.warning("bonus schedule run skipped: %s", exc.message, extra={
                        **context, "reason": exc.reason})
                    accepted = None
                except Exception:
                    # Not advanced: the run stays due and the next sweep tries it again.
                    log.exception("bonus schedule run failed; retried on the next sweep",
                                  extra=context)
                    failed.append(due.pk)
                    continue
                await conn.execute(
                    "UPDATE bonus_schedules SET next_run_at = $2, last_run_at = $3 WHERE id = $1",
                    due.pk, next_run(due.schedule, run_at), run_at)
                if accepted is not None and accepted.outbox_job_id is not None:
                    jobs.append((accepted.outbox_job_id, accepted.due_at))


async def _run_schedule(conn: asyncpg.Connection, row: asyncpg.Record, due: ScheduleRow,
                        default_window: int) -> Accepted | None:
    """Make one run's requests, as of its scheduled time (None: nobody to request for)."""
    run_at = due.next_run_at
    definition = await get_definition(conn, due.schedule.definition_id)
    targets = list(due.schedule.customer_ids)
    period: tuple[datetime, datetime] | None = None
    if row["campaign_pk"] is not None:
        targets = await _campaign_customers(conn, row["campaign_pk"])
        if due.schedule.since_campaign_entrance:
            entered = await conn.fetchval(
                "SELECT executed_at FROM campaigns WHERE id = $1", row["campaign_pk"])
            if entered is None or entered >= run_at:  # not run yet: nobody entered
                targets = []
            else:
                period = (entered, run_at)
    if not targets:
        return None
    accepted = await add_requests(
        conn, definition, [NewRequest(c, schedule_request_key(due.schedule.schedule_id, run_at, c),
                                      period) for c in targets],
        now=run_at, default_window=default_window,
        source=f"schedule:{due.schedule.schedule_id}", empty_periods=EmptyPeriods.OMIT)
    if accepted.omitted:
        # A period in each customer's zone: those at their midnight have nothing to read yet
        # (no request, as for a run skipped as a whole); the others are computed.
        shown = ", ".join(repr(c) for c in accepted.omitted[:10])
        more = f" and {len(accepted.omitted) - 10} more" if len(accepted.omitted) > 10 else ""
        log.warning("bonus schedule run left out %d customer(s) whose period is empty at the "
                    "run time: %s%s", len(accepted.omitted), shown, more, extra={
                        "schedule_id": due.schedule.schedule_id,
                        "definition_id": due.schedule.definition_id,
                        "run_time": run_at.isoformat(), "reason": "INVALID_PERIOD",
                        "count": len(accepted.omitted)})
    return accepted
