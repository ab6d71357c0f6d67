"""Dynamic bonuses in PostgreSQL: definitions, requests, the batch, results and the ledger.

The batch (seed 004: "all calculations are batched by 5-minute intervals"): every request is a
row assigned to a batching window; one outbox job per (definition, window), due when the window
closes, computes every pending request of the definition with one aggregate pass
(storage.aggregates, 1,000 customers per statement), evaluates each customer, and writes the
results WRITE_CHUNK requests per transaction on one or two connections of their own while it
computes the next ones (see _Writer). Why this is crash-safe:

* a result is unique per request (``bonus_results.request_pk``), and the request is marked DONE
  in the same transaction as its result, its ledger entry and its events; a batch that dies
  mid-way is retried by the outbox and finds only the requests not yet written;
* the ledger is unique per bonus, events carry dedup keys: nothing is issued or told twice;
* a session advisory lock per definition keeps two copies of a batch job from computing the same
  requests at once (the second reports "already running" and the outbox retries it later);
  a second lock per window tells the two cases apart: a copy of the same window's job stands
  aside (WindowBusy), the next window's job while an earlier one still runs is put off for a
  few seconds (DefinitionBusy), not for a whole lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import os
import time
import uuid
from collections.abc import AsyncGenerator, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from decimal import Decimal
from typing import Any, NamedTuple

import asyncpg

from core.bonuses.definitions import (
    ApprovalMode,
    BonusDefinition,
    DataMode,
    PointsTarget,
    ResultType,
    period_from_stored,
    variables_from_stored,
)
from core.bonuses.results import (
    RECALCULABLE,
    BonusStatus,
    Decision,
    amount_places,
    check_decision,
    decide,
    event_payload,
)
from core.bonuses.windows import window_end, window_start
from core.customers import PropertyValue, typed_attributes
from core.errors import AlreadyExists, InvalidArgument, NotFound
from core.events import EventType
from core.formula import (
    AggregateSpec,
    AggregateValue,
    CompiledFormula,
    Evaluation,
    FormulaInputs,
    Outcome,
    ResultOptions,
    SkipReason,
)
from core.formula.memory import EventRecord, filter_matches
from core.money import shown_number
from core.periods import MAX_PERIOD, describe_length, resolve_period
from core.rounding import RoundingMode
from storage import aggregates as aggregates_repo
from storage import outbox
from storage.customers import decode_properties
from storage.webhooks import EventRow, emit_event, emit_events

BATCH_JOB_KIND = "bonus.batch"
# A batch must not give up during a long database outage (its requests would wait for the next
# window's batch of the definition): with the outbox backoff capped at
# PROMO_JOB_RETRY_MAX_SECONDS (300 s), 1,000 attempts cover days.
BATCH_MAX_ATTEMPTS = 1000
WRITE_CHUNK = 2000
PARALLEL_WRITES_FROM = 4 * WRITE_CHUNK
PARALLEL_WRITERS = 2
# Times a batch starts over with the edited definition before the job fails (and is retried).
DEFINITION_CHANGE_RETRIES = 3
_STATUS_TEXT = {s: s.value for s in BonusStatus}
_LOCK_CLASS = 7009  # advisory lock namespace: (7009, definition pk)
_WINDOW_LOCK_CLASS = 7011  # advisory lock namespace: (7011, batch pk mod 2^31 - 1)
_EVENT_TYPES = {BonusStatus.SKIPPED: EventType.BONUS_SKIPPED,
                BonusStatus.CALCULATED: EventType.BONUS_CALCULATED,
                BonusStatus.ISSUED: EventType.BONUS_ISSUED}


# --- definitions ---------------------------------------------------------------------------


@dataclass(frozen=True)
class DefinitionRow:
    pk: int
    definition: BonusDefinition
    formula_stored: dict[str, Any]

    def compiled(self) -> CompiledFormula:
        return CompiledFormula.from_stored(self.formula_stored)


def _json(value: Any) -> Any:
    return json.loads(value) if isinstance(value, str) else value


def _definition(row: asyncpg.Record) -> DefinitionRow:
    period = _json(row["period"])
    definition = BonusDefinition(
        definition_id=row["definition_id"], display_name=row["display_name"],
        formula=row["formula_source"], result_type=ResultType(row["result_type"]),
        points_target=PointsTarget(row["points_target"]) if row["points_target"] else None,
        min_allowed=row["min_allowed"], cap_amount=row["cap_amount"],
        rounding=RoundingMode(row["rounding"]), decimals=row["decimals"],
        rounding_factor=row["rounding_factor"], data_mode=DataMode(row["data_mode"]),
        period=period_from_stored(period), approval_mode=ApprovalMode(row["approval_mode"]),
        batch_window_seconds=row["batch_window_seconds"],
        skipped_message=row["skipped_message"], calculated_message=row["calculated_message"],
        issued_message=row["issued_message"],
        variables=variables_from_stored(_json(row["variables"])), revision=row["revision"],
        create_time=row["create_time"], update_time=row["update_time"])
    return DefinitionRow(pk=row["id"], definition=definition,
                         formula_stored=_json(row["formula_stored"]))


def _not_found(definition_id: str) -> NotFound:
    return NotFound(f"no bonus definition {definition_id!r}", reason="BONUS_DEFINITION_NOT_FOUND",
                    metadata={"definition_id": definition_id})


def _definition_values(d: BonusDefinition, compiled: CompiledFormula) -> list[Any]:
    period = d.period_dict()
    return [d.display_name, d.formula, json.dumps(compiled.to_stored()), d.result_type.value,
            d.points_target.value if d.points_target else None, d.min_allowed, d.cap_amount,
            d.rounding.value, d.decimals, d.rounding_factor, d.data_mode.value,
            None if period is None else json.dumps(period), d.approval_mode.value,
            d.batch_window_seconds, d.skipped_message, d.calculated_message, d.issued_message,
            json.dumps([v.to_stored() for v in d.variables])]


async def insert_definition(conn: asyncpg.Connection, d: BonusDefinition,
                            compiled: CompiledFormula, *, now: datetime) -> DefinitionRow:
    row = await conn.fetchrow(
        """INSERT INTO bonus_definitions
               (definition_id, display_name, formula_source, formula_stored, result_type,
                points_target, min_allowed, cap_amount, rounding, decimals, rounding_factor,
                data_mode, period, approval_mode, batch_window_seconds, skipped_message,
                calculated_message, issued_message, variables, create_time, update_time)
           VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8, $9, $10, $11, $12, $13::jsonb, $14,
                   $15, $16, $17, $18, $19::jsonb, $20, $20)
           ON CONFLICT (definition_id) DO NOTHING
           RETURNING *""",
        d.definition_id, *_definition_values(d, compiled), now)
    if row is None:
        raise AlreadyExists(f"bonus definition {d.definition_id!r} already exists",
                            reason="BONUS_DEFINITION_EXISTS",
                            metadata={"definition_id": d.definition_id})
    return _definition(row)


async def update_definition(conn: asyncpg.Connection, pk: int, d: BonusDefinition,
                            compiled: CompiledFormula, *, now: datetime) -> DefinitionRow:
    row = await conn.fetchrow(
        """UPDATE bonus_definitions
              SET display_name = $2, formula_source = $3, formula_stored = $4::jsonb,
                  result_type = $5, points_target = $6, min_allowed = $7, cap_amount = $8,
                  rounding = $9, decimals = $10, rounding_factor = $11, data_mode = $12,
                  period = $13::jsonb, approval_mode = $14, batch_window_seconds = $15,
                  skipped_message = $16, calculated_message = $17, issued_message = $18,
                  variables = $19::jsonb, revision = $20, update_time = $21
            WHERE id = $1 RETURNING *""",
        pk, *_definition_values(d, compiled), d.revision, now)
    assert row is not None
    return _definition(row)


async def get_definition(conn: asyncpg.Connection, definition_id: str, *,
                         for_update: bool = False) -> DefinitionRow:
    # NO KEY UPDATE: serializes edits and recalculations with each other and with a batch's
    # FOR SHARE check, without making new requests' and rules' foreign-key checks (KEY SHARE)
    # wait for an edit.
    lock = " FOR NO KEY UPDATE" if for_update else ""
    row = await conn.fetchrow(
        f"SELECT * FROM bonus_definitions WHERE definition_id = $1{lock}", definition_id)
    if row is None:
        raise _not_found(definition_id)
    return _definition(row)


async def get_definition_by_pk(conn: asyncpg.Connection, pk: int) -> DefinitionRow | None:
    row = await conn.fetchrow("SELECT * FROM bonus_definitions WHERE id = $1", pk)
    return None if row is None else _definition(row)


async def list_definitions(conn: asyncpg.Connection, *, after_id: str | None,
                           limit: int) -> list[DefinitionRow]:
    rows = await conn.fetch(
        """SELECT * FROM bonus_definitions WHERE $1::text IS NULL OR definition_id > $1
            ORDER BY definition_id LIMIT $2""", after_id, limit)
    return [_definition(row) for row in rows]


# --- requests --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Accepted:
    window_start: datetime
    due_at: datetime
    accepted: int
    outbox_job_id: int | None
    # Customers left out because their period was empty (EmptyPeriods.OMIT), in request order.
    omitted: tuple[str, ...] = ()


class EmptyPeriods(enum.Enum):
    """What add_requests does with a customer whose period resolves empty ("today so far" at
    midnight in the customer's zone)."""

    REFUSE = "refuse"  # the whole call is INVALID_ARGUMENT INVALID_PERIOD (an API call)
    SKIP = "skip"  # stored with the empty window; its result is SKIPPED INVALID_PERIOD (a rule)
    OMIT = "omit"  # no request for that customer (a schedule run; all empty: REFUSE)


class _Customer(NamedTuple):
    """A tuple: a batch builds one per customer (100,000 in a large window), and a frozen
    dataclass costs several times as much to create."""

    customer_id: str
    time_zone: str | None
    currency: str | None
    properties: dict[str, PropertyValue]


async def known_customers(conn: asyncpg.Connection, ids: Iterable[str], *,
                     properties: bool = True) -> dict[str, _Customer]:
    """The customers among ``ids``; their properties only when asked (decoding them is a
    noticeable part of a large batch whose formula reads none)."""
    rows = await conn.fetch(
        """SELECT customer_id, time_zone, currency,
                  CASE WHEN $2 THEN properties::text END AS properties
             FROM customers WHERE customer_id = ANY($1::text[])""", list(set(ids)), properties)
    return {r["customer_id"]: _Customer(
        r["customer_id"], r["time_zone"], r["currency"],
        decode_properties(r["properties"]) if properties else {}) for r in rows}


@dataclass(frozen=True)
class NewRequest:
    """One customer's request: ``key`` is unique per definition (a retry adds nothing);
    ``period`` an explicit transaction window (else the definition's period, resolved at
    ``now`` in the customer's time zone)."""

    customer_id: str
    key: str
    period: tuple[datetime, datetime] | None = None


async def add_requests(conn: asyncpg.Connection, row: DefinitionRow,
                       requests: Sequence[NewRequest], *, now: datetime, default_window: int,
                       source: str = "api",
                       empty_periods: EmptyPeriods = EmptyPeriods.REFUSE) -> Accepted:
    """Store requests in the current batching window and make sure its batch job exists.

    Run inside the caller's transaction; queue ``outbox_job_id`` after commit. Unknown
    customers are NOT_FOUND and nothing is stored. A customer whose period of the definition is
    empty at ``now`` is handled as ``empty_periods`` says."""
    d = row.definition
    seconds = d.batch_window_seconds or default_window
    start = window_start(now, seconds)
    end = window_end(start, seconds)
    customers = await known_customers(conn, (r.customer_id for r in requests))
    missing = sorted({r.customer_id for r in requests} - customers.keys())
    if missing:
        shown = ", ".join(repr(c) for c in missing[:10])
        more = f" and {len(missing) - 10} more" if len(missing) > 10 else ""
        raise NotFound(f"unknown customers: {shown}{more}", reason="CUSTOMER_NOT_FOUND",
                       metadata={"customer_id": missing[0], "count": len(missing)})
    starts: list[datetime | None] = []
    ends: list[datetime | None] = []
    revisions: list[int | None] = []
    kept: list[NewRequest] = []
    omitted: list[str] = []
    for request in requests:
        if d.data_mode is DataMode.PROPERTIES_ONLY:
            window: tuple[datetime | None, datetime | None] = (None, None)
        elif request.period is not None:
            window = request.period
        else:
            zone = customers[request.customer_id].time_zone
            window = _definition_window(
                d, now=now, time_zone=zone,
                allow_empty=empty_periods is not EmptyPeriods.REFUSE)
            if empty_periods is EmptyPeriods.OMIT and window[0] == window[1]:
                omitted.append(request.customer_id)
                continue
        kept.append(request)
        starts.append(window[0])
        ends.append(window[1])
        # A request without a window of its own follows its definition's period: see
        # migration 0019 and _current_windows.
        revisions.append(d.revision if request.period is None else None)
    if not kept and omitted:
        # Nobody's period has started: resolved without allow_empty, the first one raises the
        # error a refused call gets (the run is skipped as a whole).
        _definition_window(d, now=now, time_zone=customers[omitted[0]].time_zone)
        raise AssertionError("an empty period resolves to INVALID_PERIOD")
    requests = kept
    accepted = await conn.fetchval(
        """WITH added AS (
               INSERT INTO bonus_requests (definition_pk, request_key, customer_id, window_start,
                                           request_time, period_start, period_end, source,
                                           period_revision)
               SELECT $1, t.key, t.customer_id, $2, $3, t.period_start, t.period_end, $4,
                      t.revision
                 FROM unnest($5::text[], $6::text[], $7::timestamptz[], $8::timestamptz[],
                             $9::bigint[])
                      AS t(key, customer_id, period_start, period_end, revision)
                ORDER BY t.key
               ON CONFLICT (definition_pk, request_key) DO NOTHING
               RETURNING 1)
           SELECT count(*) FROM added""",
        row.pk, start, now, source, [r.key for r in requests],
        [r.customer_id for r in requests], starts, ends, revisions)
    job_id = None
    if accepted:
        await conn.execute(
            """INSERT INTO bonus_batches (definition_pk, window_start, window_end)
               VALUES ($1, $2, $3) ON CONFLICT (definition_pk, window_start) DO NOTHING""",
            row.pk, start, end)
        # A window whose batch has run gets work again (a late schedule run, a straggler):
        # its record is unfinished until the batch runs again, so the retention purge, which
        # takes finished records only, cannot delete it under that batch. Only such a record
        # is locked: an open window's (finish_time NULL) is not touched.
        await conn.execute(
            """UPDATE bonus_batches SET finish_time = NULL
                WHERE definition_pk = $1 AND window_start = $2 AND finish_time IS NOT NULL""",
            row.pk, start)
        job_id = await _ensure_batch_job(conn, row.pk, start, end, now=now)
    return Accepted(window_start=start, due_at=end, accepted=int(accepted),
                    outbox_job_id=job_id, omitted=tuple(omitted))


def _definition_window(d: BonusDefinition, *, now: datetime, time_zone: str | None,
                       allow_empty: bool = False) -> tuple[datetime | None, datetime | None]:
    """The transaction window the definition's own period gives at ``now`` in the customer's
    zone ((None, None) for a properties-only definition, which reads no transactions). An
    empty period is INVALID_ARGUMENT, or with ``allow_empty`` the empty window (start = end),
    which the batch turns into a SKIPPED INVALID_PERIOD result."""
    if d.data_mode is DataMode.PROPERTIES_ONLY or d.period is None:
        return None, None
    resolved = resolve_period(d.period, now=now, customer_time_zone=time_zone,
                              allow_empty=allow_empty)
    return resolved.start, resolved.end


async def _current_windows(conn: asyncpg.Connection, d: BonusDefinition,
                           rows: Sequence[asyncpg.Record]) -> list[_Pending]:
    """Requests (id, customer_id, period_start, period_end, period_revision, request_time,
    source) as the batch computes them: a request that followed its definition's period, stored
    under an older revision, reads the period of the current one as of its own request time (an
    operator who widens the period and recalculates gets the wider window). The common case
    (nothing edited since) costs one comparison per request."""
    stale = [r for r in rows
             if r["period_revision"] is not None and r["period_revision"] != d.revision]
    zones = {c.customer_id: c.time_zone for c in (await known_customers(
        conn, (r["customer_id"] for r in stale), properties=False)).values()} if stale else {}
    pending = []
    for r in rows:
        start, end = r["period_start"], r["period_end"]
        if r["period_revision"] is not None and r["period_revision"] != d.revision:
            # allow_empty: a period edited to "today so far" is empty for a request made at
            # the customer's midnight; that request is skipped, the batch goes on.
            start, end = _definition_window(d, now=r["request_time"],
                                            time_zone=zones.get(r["customer_id"]),
                                            allow_empty=True)
        # A caller's explicit period (source "api") had its length checked when it was
        # requested, in its time zone if the call named one; only a trigger's window is
        # measured here.
        pending.append(_Pending(r["id"], r["customer_id"], start, end,
                                r["period_revision"] is not None or r["source"] == "api"))
    return pending


async def _ensure_batch_job(conn: asyncpg.Connection, definition_pk: int, start: datetime,
                            end: datetime, *, now: datetime) -> int | None:
    """Make sure a batch job will compute the window's pending requests; returns the job id to
    queue after commit (None: a job already waits for the window).

    One job per (definition, window) by its dedup key. A request can join a window whose batch
    has already run: a schedule run late (workers were down) is made "as of" its scheduled
    time, or a request commits just after the batch read the pending ones. The finished job is
    then armed again, due now, rather than leaving the request to whichever later request of
    the definition comes along (for a weekly schedule: a week). A job that died (ran out of
    attempts) stays dead: that is an operator's to look at, not to retry forever."""
    job_id = await outbox.add_job(
        conn, kind=BATCH_JOB_KIND, due_at=end,
        payload={"definition": definition_pk, "window_start": start.isoformat(),
                 "window_end": end.isoformat()},
        dedup_key=_batch_dedup_key(definition_pk, start), max_attempts=BATCH_MAX_ATTEMPTS)
    if job_id is None:
        job_id = await outbox.rearm_done_job(conn, _batch_dedup_key(definition_pk, start),
                                             due_at=max(end, now))
    return job_id


def _batch_dedup_key(definition_pk: int, start: datetime) -> str:
    return f"bonus-batch:{definition_pk}:{start.isoformat()}"


async def rearm_stranded_batches(conn: asyncpg.Connection, *,
                                 now: datetime) -> list[tuple[int, datetime]]:
    """The sweeper's safety net for invariant 3 (no calculation request lost): every window
    that still has PENDING requests after it closed gets a batch job again if its own job has
    finished (see :func:`_ensure_batch_job`; a request that committed while the batch was
    finishing is the case this catches). Returns (job id, due) pairs to queue."""
    windows = await conn.fetch(
        """SELECT DISTINCT q.definition_pk, q.window_start, b.window_end
             FROM bonus_requests q
             JOIN bonus_batches b ON b.definition_pk = q.definition_pk
                                 AND b.window_start = q.window_start
            WHERE q.status = 'PENDING' AND b.window_end <= $1
            ORDER BY q.definition_pk, q.window_start""", now)
    armed = []
    for w in windows:
        async with conn.transaction():
            job_id = await _ensure_batch_job(conn, w["definition_pk"], w["window_start"],
                                             w["window_end"], now=now)
        if job_id is not None:
            armed.append((job_id, max(w["window_end"], now)))
    return armed


# --- computing -------------------------------------------------------------------------------


class _Pending(NamedTuple):
    """One request as the batch computes it (a tuple, as _Customer)."""

    pk: int
    customer_id: str
    period_start: datetime | None
    period_end: datetime | None
    # True when the window's length was checked already: the definition's own period,
    # resolved (and measured the way the period is: calendar days, or wall-clock time in a
    # fixed period's zone) by core.periods, or a caller's explicit period, checked when it was
    # requested (in the time zone the call named). A trigger's window is checked here, in UTC.
    length_checked: bool


class Computed(NamedTuple):
    """One request's evaluation and decision (a tuple, as _Customer)."""

    request_pk: int
    customer_id: str
    evaluation: Evaluation
    decision: Decision
    currency: str | None
    period_start: datetime | None
    period_end: datetime | None
    events_read: int  # the events its aggregates counted (the batch's recorded cost)


def _rounds(pending: Sequence[_Pending]) -> list[list[_Pending]]:
    """Split requests so that a customer appears once per aggregate statement (a customer with
    two requests in one window, e.g. two deposits, gets a second, smaller pass)."""
    rounds: list[list[_Pending]] = []
    seen: dict[str, int] = {}
    for request in pending:
        index = seen.get(request.customer_id, 0)
        seen[request.customer_id] = index + 1
        if index == len(rounds):
            rounds.append([])
        rounds[index].append(request)
    return rounds


def _computed(p: _Pending, customer: _Customer | None,
              aggregates: Mapping[str, AggregateValue], compiled: CompiledFormula,
              approval: ApprovalMode, options: ResultOptions, read: int) -> Computed:
    """One request's evaluation and decision; ``read``: the events its aggregates counted."""
    currency = customer.currency if customer else None
    if p.period_start is not None and p.period_end is not None and (
            p.period_end <= p.period_start):
        # The definition's period had not started at the request ("today so far" at the
        # customer's midnight): there is nothing to read, and zero is not what it means.
        evaluation = Evaluation(
            outcome=Outcome.SKIPPED, skip_reason=SkipReason.INVALID_PERIOD,
            skip_detail=f"the transaction period is empty: it starts and ends at "
                        f"{p.period_start.isoformat()}")
    elif (p.period_start is not None and p.period_end is not None
            and not p.length_checked and p.period_end - p.period_start > MAX_PERIOD):
        # A trigger's window (e.g. qualification to last bet) grew past the vendor's limit. Not
        # the definition's own period: "last full month" in Berlin is 31 days and 1 hour of
        # UTC in October, and its length was checked in days when it was resolved.
        evaluation = Evaluation(
            outcome=Outcome.SKIPPED, skip_reason=SkipReason.INVALID_PERIOD,
            skip_detail=f"the transaction period is "
                        f"{describe_length(p.period_end - p.period_start)}, more than the "
                        "31 days allowed")
    else:
        evaluation = compiled.evaluate(FormulaInputs(
            aggregates=aggregates, properties=customer.properties if customer else {},
            currency=currency), options)
    return Computed(p.pk, p.customer_id, evaluation, decide(evaluation, approval, options),
                    currency, p.period_start, p.period_end, read)


async def _compute(conn: asyncpg.Connection, row: DefinitionRow, compiled: CompiledFormula,
                   pending: Sequence[_Pending],
                   approval: ApprovalMode) -> AsyncGenerator[list[Computed], None]:
    """Every request's result, in request order, one aggregate chunk at a time: aggregates in
    one pass per round (the database computes chunk k+1 while this evaluates chunk k), then one
    evaluation each."""
    d = row.definition
    options = d.options
    customers = await known_customers(conn, (p.customer_id for p in pending),
                                 properties=bool(compiled.properties_used))
    rounds = _rounds(pending)
    streamed = (compiled.aggregates and d.data_mode is DataMode.TRANSACTIONS_AND_PROPERTIES
                and len(rounds) == 1
                and all(p.period_start is not None and p.period_end is not None
                        for p in pending))
    if streamed:
        # The common case (one request per customer, all with a transaction window): results
        # leave chunk by chunk, in request order, while the next chunk is being aggregated.
        windows = [(p.customer_id, p.period_start, p.period_end) for p in pending]
        shared = {(w[1], w[2]) for w in windows}
        if len(shared) == 1:  # one window for all (fixed dates, a schedule's run in UTC)
            [(start, end)] = shared
            chunks = aggregates_repo.iter_aggregates_for_customers(
                conn, compiled.aggregates, [w[0] for w in windows], start, end)
        else:
            chunks = aggregates_repo.iter_aggregates_for_windows(
                conn, compiled.aggregates, windows)  # type: ignore[arg-type]
        offset = 0
        no_values: Mapping[str, AggregateValue] = {}
        find_customer = customers.get
        async with contextlib.aclosing(chunks):  # type: ignore[type-var]
            async for values in chunks:
                batch = pending[offset:offset + len(values)]
                offset += len(batch)
                out = []
                for p in batch:
                    aggregates = values.get(p.customer_id, no_values)
                    read = 0
                    for v in aggregates.values():
                        read += v.count
                    out.append(_computed(p, find_customer(p.customer_id), aggregates, compiled,
                                         approval, options, read))
                yield out
        assert offset == len(pending), (offset, len(pending))
        return
    found: dict[int, Mapping[str, AggregateValue]] = {}
    if compiled.aggregates and d.data_mode is DataMode.TRANSACTIONS_AND_PROPERTIES:
        for batch in rounds:
            windows = [(p.customer_id, p.period_start, p.period_end) for p in batch
                       if p.period_start is not None and p.period_end is not None]
            shared = {(w[1], w[2]) for w in windows}
            if len(shared) == 1:
                [(start, end)] = shared
                values = await aggregates_repo.aggregate_for_customers(
                    conn, compiled.aggregates, [w[0] for w in windows], start, end)
            else:
                values = await aggregates_repo.aggregate_for_windows(
                    conn, compiled.aggregates, windows)  # type: ignore[arg-type]
            for p in batch:
                found[p.pk] = values.get(p.customer_id, {})
    for offset in range(0, len(pending), aggregates_repo.DEFAULT_CHUNK_SIZE):
        chunk = []
        for p in pending[offset:offset + aggregates_repo.DEFAULT_CHUNK_SIZE]:
            aggregates = found.get(p.pk, {})
            chunk.append(_computed(p, customers.get(p.customer_id), aggregates, compiled,
                                   approval, options,
                                   sum(v.count for v in aggregates.values())))
        yield chunk


def _aggregates_json(compiled: CompiledFormula, evaluation: Evaluation) -> str:
    """The aggregates a result shows (stored as jsonb): each of the formula's aggregates with
    its description, value and count. Built from per-formula fragments: one json.dumps per
    result was a tenth of a batch's Python time."""
    used = evaluation.aggregates_used
    parts = []
    for key, head in _described(compiled):
        value = used.get(key)
        if value is None:
            parts.append(f'{head}"value": null, "count": 0, "read": false}}')
        elif value.value is None:
            parts.append(f'{head}"value": null, "count": {int(value.count)}, "read": true}}')
        else:
            parts.append(f'{head}"value": "{value.value:f}", "count": {int(value.count)}, '
                         '"read": true}')
    return "[" + ", ".join(parts) + "]"


_DESCRIBED: dict[int, tuple[CompiledFormula, list[tuple[str, str]]]] = {}


def _described(compiled: CompiledFormula) -> list[tuple[str, str]]:
    """Each aggregate's key and the start of its JSON object (key and description), computed
    once per compiled formula."""
    found = _DESCRIBED.get(id(compiled))
    if found is None or found[0] is not compiled:
        if len(_DESCRIBED) > 100:
            _DESCRIBED.clear()
        found = _DESCRIBED[id(compiled)] = (compiled, [
            (s.key, f'{{"key": {json.dumps(s.key)}, "description": {json.dumps(s.describe())}, ')
            for s in compiled.aggregates])
    return found[1]


def _raw(evaluation: Evaluation) -> str | None:
    # Scientific from 10^100 on: 10^983045 was 1 MB of text per stored result.
    return None if evaluation.raw_value is None else shown_number(evaluation.raw_value)


@dataclass
class BatchReport:
    batch_pk: int | None = None
    definition_id: str | None = None  # None: the definition was deleted before the batch ran
    requests: int = 0
    # Counted from the results this run wrote (not from what it computed: a pass dropped after
    # an edit computed some of them twice).
    customer_ids: set[str] = field(default_factory=set)
    events_read: int = 0
    duration_ms: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    outbox_job_ids: list[int] = field(default_factory=list)

    @property
    def customers(self) -> int:
        return len(self.customer_ids)

    def add(self, written: _Written) -> None:
        """A committed chunk's results."""
        self.outbox_job_ids += written.outbox_job_ids
        self.requests += written.requests
        self.customer_ids |= written.customer_ids
        self.events_read += written.events_read
        for status, count in written.statuses.items():
            self.statuses[status] = self.statuses.get(status, 0) + count


class BatchBusy(Exception):
    """Another worker is computing this definition's batch right now."""


class WindowBusy(BatchBusy):
    """Another run of this very window (a second copy of its job) holds it: whatever it
    leaves pending is re-armed when it finishes, so this run has nothing to do."""


class DefinitionBusy(BatchBusy):
    """The definition's batch of another window (an earlier one still running, or a re-armed
    one) holds the definition: this window's requests are not in it, so try again shortly."""


async def run_batch(pool: asyncpg.Pool, definition_pk: int, window: datetime, *,
                    now: datetime) -> BatchReport:
    """Compute every pending request of the definition in windows up to ``window``.

    Two connections work at once: this one (holding the definition's lock) aggregates and
    evaluates, a second one writes the finished results, WRITE_CHUNK requests per transaction,
    so the database writes chunk k while Python computes chunk k+1 (bench/dynamic_batch.py)."""
    started = time.perf_counter()
    report = BatchReport()
    async with pool.acquire() as conn:
        report.batch_pk = await conn.fetchval(
            "SELECT id FROM bonus_batches WHERE definition_pk = $1 AND window_start = $2",
            definition_pk, window)
        window_key = None if report.batch_pk is None else report.batch_pk % 2147483647
        if window_key is not None and not await conn.fetchval(
                "SELECT pg_try_advisory_lock($1, $2::int)", _WINDOW_LOCK_CLASS, window_key):
            raise WindowBusy(f"the batch of bonus definition {definition_pk}, window "
                             f"{window.isoformat()}, is being computed elsewhere")
        try:
            await _run_batch_locked(pool, conn, definition_pk, window, report, started,
                                    now=now)
        finally:
            if window_key is not None:
                await conn.execute("SELECT pg_advisory_unlock($1, $2::int)",
                                   _WINDOW_LOCK_CLASS, window_key)
    return report


async def _run_batch_locked(pool: asyncpg.Pool, conn: asyncpg.Connection, definition_pk: int,
                            window: datetime, report: BatchReport, started: float, *,
                            now: datetime) -> None:
    """run_batch under its window's lock: the definition's lock, then the work."""
    if not await conn.fetchval("SELECT pg_try_advisory_lock($1, $2)", _LOCK_CLASS,
                               definition_pk):
        raise (DefinitionBusy if report.batch_pk is not None else BatchBusy)(
            f"bonus definition {definition_pk} is being computed elsewhere")
    try:
        for attempt in range(1, DEFINITION_CHANGE_RETRIES + 1):
            row = await get_definition_by_pk(conn, definition_pk)
            if row is None:
                return
            report.definition_id = row.definition.definition_id
            try:
                await _compute_and_write(pool, conn, row, window, report, now=now)
                break
            except DefinitionChanged:
                # The chunks written before the edit stay (they were committed under the
                # old revision, before the edit could commit: a recalculation covers
                # them); the rest is computed again with the definition as it is now.
                if attempt == DEFINITION_CHANGE_RETRIES:
                    raise
        report.duration_ms = round((time.perf_counter() - started) * 1000)
        if report.batch_pk is not None:
            await conn.execute(
                """UPDATE bonus_batches
                      SET request_count = request_count + $2,
                          customer_count = customer_count + $3,
                          events_read = events_read + $4, duration_ms = duration_ms + $5,
                          finish_time = $6
                    WHERE id = $1""",
                report.batch_pk, report.requests, report.customers, report.events_read,
                report.duration_ms, now)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1, $2)", _LOCK_CLASS, definition_pk)


async def _compute_and_write(pool: asyncpg.Pool, conn: asyncpg.Connection, row: DefinitionRow,
                             window: datetime, report: BatchReport, *, now: datetime) -> None:
    """One pass of run_batch with one revision of the definition: every pending request of
    windows up to ``window``, computed on ``conn`` and written by the writers."""
    pending = await _current_windows(conn, row.definition, await conn.fetch(
        """SELECT id, customer_id, period_start, period_end, period_revision, request_time,
                  source
             FROM bonus_requests
            WHERE definition_pk = $1 AND status = 'PENDING' AND window_start <= $2
            ORDER BY id""", row.pk, window))
    if not pending:
        return
    compiled = row.compiled()
    # Each writer needs a connection besides this one.
    writers = min(PARALLEL_WRITERS if len(pending) >= PARALLEL_WRITES_FROM else 1,
                  pool.get_max_size() - 1)
    if writers < 1:  # a one-connection pool: compute everything, then write here
        await _compute_then_write(conn, row, compiled, pending, now=now, report=report)
        return
    async with _Writer(pool, row, compiled, now=now, batch_pk=report.batch_pk,
                       report=report, writers=writers) as writer:
        buffered: list[Computed] = []
        async with contextlib.aclosing(_compute(
                conn, row, compiled, pending, row.definition.approval_mode)) as chunks:
            async for chunk in chunks:
                buffered += chunk
                while len(buffered) >= WRITE_CHUNK:
                    await writer.put(buffered[:WRITE_CHUNK])
                    del buffered[:WRITE_CHUNK]
        if buffered:
            await writer.put(buffered)


class DefinitionChanged(RuntimeError):
    """The definition got a new revision, approval mode or message while its batch was
    computing."""


async def _check_definition(conn: asyncpg.Connection, row: DefinitionRow) -> None:
    """First statement of every result transaction: the definition is still the one the
    results were computed with. FOR SHARE holds an edit (UPDATE bonus_definitions) until this
    chunk commits, so an edit either comes after the chunk (and a recalculation covers it) or
    before it (and the chunk is computed again): never a result of a replaced formula, nor one
    issued automatically after the operator switched to manual approval, nor an event with a
    message the operator already replaced (the chunk's events are rendered before its
    transaction, from the definition as read)."""
    current = await conn.fetchrow(
        """SELECT revision, approval_mode, skipped_message, calculated_message, issued_message
             FROM bonus_definitions WHERE id = $1 FOR SHARE""", row.pk)
    d = row.definition
    if current is None or tuple(current) != (
            d.revision, d.approval_mode.value, d.skipped_message, d.calculated_message,
            d.issued_message):
        raise DefinitionChanged(f"bonus definition {d.definition_id!r} changed while its batch "
                                "was computing")


async def _compute_then_write(conn: asyncpg.Connection, row: DefinitionRow,
                              compiled: CompiledFormula, pending: Sequence[_Pending],
                              *, now: datetime, report: BatchReport) -> None:
    """run_batch on a single connection (a pool of one): no overlap, same transactions."""
    computed = [c async for chunk in _compute(conn, row, compiled, pending,
                                              row.definition.approval_mode)
                for c in chunk]
    for offset in range(0, len(computed), WRITE_CHUNK):
        async with conn.transaction():
            written = await _write_results(conn, row, compiled,
                                           computed[offset:offset + WRITE_CHUNK], now=now,
                                           batch_pk=report.batch_pk)
        report.add(written)


class _WritersStopped(RuntimeError):
    """A writer failed; its own error is raised once every writer has stopped."""


class _Writer:
    """Writes chunks of computed results on connections of their own, one transaction per
    chunk, while the caller computes the next ones. A batch of PARALLEL_WRITES_FROM requests or
    more gets two writers (writing is most of the database's work, and a second backend uses
    the second core once the aggregate pass is done); chunks then commit in about, not exactly,
    request order. A chunk that fails stops every writer before its next chunk and re-raises
    the error in the caller; chunks already committed stay (their requests are DONE), the rest
    stay PENDING for the retried batch."""

    def __init__(self, pool: asyncpg.Pool, row: DefinitionRow, compiled: CompiledFormula, *,
                 now: datetime, batch_pk: int | None, report: BatchReport,
                 writers: int) -> None:
        self._pool, self._row, self._compiled = pool, row, compiled
        self._now, self._batch_pk, self._report = now, batch_pk, report
        self._writers = writers
        # Two chunks ahead at most: enough to keep the writers busy, little memory (room for
        # one stop marker per writer once it is drained).
        self._queue: asyncio.Queue[list[Computed] | None] = asyncio.Queue(
            maxsize=max(2, writers))
        self._tasks: list[asyncio.Task[None]] = []
        self._failed = False

    async def __aenter__(self) -> _Writer:
        self._tasks = [asyncio.ensure_future(self._run()) for _ in range(self._writers)]
        return self

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc is None:
            try:
                for _ in self._tasks:
                    await self.put(None)
            except _WritersStopped:
                await self._stop()
                self._raise()  # the writer's own error
                raise
            except BaseException:
                await self._stop()
                raise
            await asyncio.wait(self._tasks)
            self._raise()
            return
        await self._stop()
        if isinstance(exc, _WritersStopped):
            self._raise()  # the writer's own error rather than "stopped"

    async def _stop(self) -> None:
        # The caller failed (or was cancelled): let each writer finish the chunk it is
        # writing, take no other, and return only once they are all done. Cancelling them
        # instead could interrupt a COMMIT that the server then completes after we returned.
        self._failed = True
        while not self._queue.empty():
            self._queue.get_nowait()
        for _ in self._tasks:
            self._queue.put_nowait(None)
        await asyncio.wait(self._tasks)
        for task in self._tasks:  # retrieved: the caller's error is the one raised
            if not task.cancelled():
                task.exception()

    def _raise(self) -> None:
        for task in self._tasks:
            if task.done() and not task.cancelled() and task.exception() is not None:
                task.result()

    async def put(self, chunk: list[Computed] | None) -> None:
        putting = asyncio.ensure_future(self._queue.put(chunk))
        while not putting.done():
            running = [t for t in self._tasks if not t.done()]
            if self._failed or not running:
                putting.cancel()
                self._raise()
                raise _WritersStopped("the bonus result writers stopped")
            await asyncio.wait({putting, *running}, return_when=asyncio.FIRST_COMPLETED)
        if self._failed:
            self._raise()

    async def _run(self) -> None:
        report = self._report
        async with self._pool.acquire() as conn:
            while not self._failed and (chunk := await self._queue.get()) is not None:
                prepared = _prepare_results(self._row, self._compiled, chunk, now=self._now)
                try:
                    async with conn.transaction():
                        written = await _write_results(conn, self._row, self._compiled,
                                                       prepared, now=self._now,
                                                       batch_pk=self._batch_pk)
                except BaseException:
                    self._failed = True
                    raise
                report.add(written)


def _event(d: BonusDefinition, *, bonus_id: str, customer_id: str, status: BonusStatus,
           result_type: str, amount: Decimal | None, template: str | None, currency: str | None,
           skip_reason: str | None, skip_detail: str | None, period_start: datetime | None,
           period_end: datetime | None, requires_approval: bool, now: datetime,
           dedup: str) -> tuple[EventType, str, dict[str, Any]]:
    """One Skipped / Calculated / Issued event: its type, dedup key and data. ``result_type``
    is the result's own (an approval issues what was calculated, even if the definition has
    changed type since); the message templates are the definition's current ones."""
    messages = {BonusStatus.SKIPPED: d.skipped_message,
                BonusStatus.CALCULATED: d.calculated_message,
                BonusStatus.ISSUED: d.issued_message}
    payload = event_payload(
        bonus_id=bonus_id, definition_id=d.definition_id, customer_id=customer_id, status=status,
        result_type=result_type, amount=amount, template=template, currency=currency,
        skip_reason=skip_reason, skip_detail=skip_detail, period_start=period_start,
        period_end=period_end, requires_approval=requires_approval,
        issued_at=now if status is BonusStatus.ISSUED else None,
        message_template=messages[status], places=amount_places(d.options))
    return _EVENT_TYPES[status], f"bonus:{bonus_id}:{dedup}", payload


async def _emit(conn: asyncpg.Connection, d: BonusDefinition, **kw: Any) -> list[int]:
    event_type, dedup_key, payload = _event(d, **kw)
    emitted = await emit_event(conn, event_type=event_type, payload=payload, now=kw["now"],
                               dedup_key=dedup_key)
    return [] if emitted is None else list(emitted.outbox_job_ids)


def _body(event_id: str, event_type: EventType, occurred_at: datetime | str,
          data: dict[str, Any]) -> str:
    """core.events.Envelope's body, byte for byte (``occurred_at`` may come as its isoformat),
    without its generic float check: bonus payloads hold only text, booleans, None and aware
    datetimes (event_payload builds them), and that check was half the cost of a batch's events
    (bench/dynamic_batch.py). The envelope's fixed keys are written directly (the event id and
    the time never need escaping) and only ``data`` goes through the encoder."""
    stamp = occurred_at if isinstance(occurred_at, str) else occurred_at.isoformat()
    return (f'{{"event_id":"{event_id}","event_type":{int(event_type)},'
            f'"occurred_at":"{stamp}","data":{_DUMPS(data)}}}')


def _unserializable(value: object) -> None:
    raise TypeError(f"bonus event payloads cannot carry a {type(value).__name__}")


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    return _unserializable(value)


def _encoder() -> Callable[[Any], str]:
    """json.dumps(separators=(",", ":"), ensure_ascii=False, allow_nan=False) with the
    datetime default, as one reusable C encoder (JSONEncoder.encode builds a new one per call,
    a noticeable cost over 100,000 events)."""
    c_make_encoder = getattr(json.encoder, "c_make_encoder", None)
    c_encode = getattr(json.encoder, "c_encode_basestring", None)
    slow = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False,
                            default=_default).encode
    if c_make_encoder is None or c_encode is None:
        return slow
    encode = c_make_encoder(None, _default, c_encode, None, ":", ",", False, False, False)
    return lambda value: "".join(encode(value, 0))


_DUMPS = _encoder()


def _uuid4s(count: int) -> list[str]:
    """``count`` random (version 4) UUIDs as text, as uuid.uuid4() makes them, at a fraction
    of its cost (one urandom call, no UUID objects)."""
    raw = bytearray(os.urandom(16 * count))
    raw[6::16] = bytes(b & 0x0F | 0x40 for b in raw[6::16])
    raw[8::16] = bytes(b & 0x3F | 0x80 for b in raw[8::16])
    text = raw.hex()
    out = []
    for i in range(0, 32 * count, 32):
        h = text[i:i + 32]
        out.append(f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}")
    return out


def _currency(d: BonusDefinition, currency: str | None) -> str | None:
    return currency if d.result_type is ResultType.AMOUNT else None


async def _ledger(conn: asyncpg.Connection, d: BonusDefinition, result: ResultRow, *,
                  now: datetime) -> None:
    """The ledger entry of an approved result: what the result says (type, points target,
    amount or template), not what the definition says now."""
    await conn.execute(
        """INSERT INTO bonus_ledger (bonus_id, customer_id, definition_id, result_type,
                                     points_target, amount, template, issue_time)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (bonus_id) DO NOTHING""",
        uuid.UUID(result.bonus_id), result.customer_id, d.definition_id, result.result_type,
        result.points_target, result.amount, result.template, now)


@dataclass
class _Written:
    requests: int = 0
    customer_ids: set[str] = field(default_factory=set)
    events_read: int = 0
    statuses: dict[str, int] = field(default_factory=dict)
    outbox_job_ids: list[int] = field(default_factory=list)


# One per connection, emptied at each commit (no WAL, no bloat in the real tables).
_STAGING_SQL = """CREATE TEMPORARY TABLE IF NOT EXISTS bonus_results_staging (
    n integer, bonus_id uuid, request_pk bigint, customer_id text, status text, amount numeric,
    template text, skip_reason text, skip_detail text, raw_value text, currency text,
    period_start timestamptz, period_end timestamptz, aggregates text, branch text,
    explanation text) ON COMMIT DELETE ROWS"""
_STAGING_COLUMNS = ("n", "bonus_id", "request_pk", "customer_id", "status", "amount", "template",
                    "skip_reason", "skip_detail", "raw_value", "currency", "period_start",
                    "period_end", "aggregates", "branch", "explanation")


@dataclass
class _Prepared:
    """One chunk's rows, built before its transaction so the transaction's statements go out
    back to back (the database writes while Python computes the next chunk)."""

    chunk: Sequence[Computed]
    records: list[tuple[Any, ...]]  # bonus_results_staging rows, one per request
    events: list[list[EventRow]]  # per request


def _prepare_results(row: DefinitionRow, compiled: CompiledFormula, chunk: Sequence[Computed],
                     *, now: datetime) -> _Prepared:
    d = row.definition
    ids = _uuid4s(len(chunk))
    records = [(n, bonus_id, c.request_pk, c.customer_id, _STATUS_TEXT[c.decision.status],
                c.decision.amount, c.decision.template, c.decision.skip_reason,
                c.decision.skip_detail, _raw(c.evaluation), _currency(d, c.currency),
                c.period_start, c.period_end, _aggregates_json(compiled, c.evaluation),
                c.evaluation.branch, c.evaluation.explain())
               for n, (bonus_id, c) in enumerate(zip(ids, chunk, strict=True))]
    occurred_at = now.isoformat()
    event_ids = iter(_uuid4s(2 * len(chunk)))
    # What _event does for each event, with the per-definition parts looked up once.
    skipped, calculated, issued = (_EVENT_TYPES[s] for s in (
        BonusStatus.SKIPPED, BonusStatus.CALCULATED, BonusStatus.ISSUED))
    fixed = dict(definition_id=d.definition_id, result_type=d.result_type.value,
                 places=amount_places(d.options))
    events = []
    for bonus_id, c in zip(ids, chunk, strict=True):
        decision = c.decision
        status = decision.status
        common: dict[str, Any] = dict(
            bonus_id=bonus_id, customer_id=c.customer_id, amount=decision.amount,
            template=decision.template, currency=_currency(d, c.currency),
            skip_reason=decision.skip_reason, skip_detail=decision.skip_detail,
            period_start=c.period_start, period_end=c.period_end, **fixed)
        if status is BonusStatus.SKIPPED:
            built = [(skipped, "skipped:1", event_payload(
                status=status, requires_approval=False, issued_at=None,
                message_template=d.skipped_message, **common))]
        else:
            built = [(calculated, "calculated:1", event_payload(
                status=BonusStatus.CALCULATED, requires_approval=status is BonusStatus.CALCULATED,
                issued_at=None, message_template=d.calculated_message, **common))]
            if status is BonusStatus.ISSUED:
                built.append((issued, "issued", event_payload(
                    status=status, requires_approval=False, issued_at=now,
                    message_template=d.issued_message, **common)))
        rows = []
        for event_type, dedup, data in built:
            event_id = next(event_ids)
            rows.append(EventRow(event_id, int(event_type), f"bonus:{bonus_id}:{dedup}",
                                 _body(event_id, event_type, occurred_at, data)))
        events.append(rows)
    return _Prepared(chunk, records, events)


async def _write_results(conn: asyncpg.Connection, row: DefinitionRow,
                         compiled: CompiledFormula, chunk: Sequence[Computed] | _Prepared, *,
                         now: datetime, batch_pk: int | None) -> _Written:
    """Results, request status, ledger and events for one chunk, in the caller's transaction.
    Requests already DONE (a retried batch) are left alone."""
    d = row.definition
    written = _Written()
    await _check_definition(conn, row)
    prepared = chunk if isinstance(chunk, _Prepared) else _prepare_results(
        row, compiled, chunk, now=now)
    # Claim the chunk's requests still pending (marked DONE in this transaction, so a retried
    # or concurrent batch cannot write them twice); those already done are left alone.
    still = {r["id"] for r in await conn.fetch(
        """UPDATE bonus_requests SET status = 'DONE'
            WHERE id = ANY($1::bigint[]) AND status = 'PENDING' RETURNING id""",
        [c.request_pk for c in prepared.chunk])}
    keep = [i for i, c in enumerate(prepared.chunk) if c.request_pk in still]
    if not keep:
        return written
    todo = [prepared.chunk[i] for i in keep]
    records = prepared.records if len(keep) == len(prepared.chunk) else [
        prepared.records[i] for i in keep]
    # The rows travel by binary COPY into a temporary table (array parameters cost more to
    # encode than everything else about a result), then one INSERT ... SELECT in their order.
    await conn.execute(_STAGING_SQL)
    await conn.copy_records_to_table("bonus_results_staging", columns=_STAGING_COLUMNS,
                                     records=records)
    await conn.execute(
        """INSERT INTO bonus_results
               (bonus_id, request_pk, definition_pk, batch_pk, customer_id, status, result_type,
                points_target, amount, template, skip_reason, skip_detail, raw_value, currency,
                period_start, period_end, aggregates, aggregate_kinds, branch, explanation,
                definition_revision, calculate_time, decide_time, decided_by)
           SELECT t.bonus_id, t.request_pk, $1, $2, t.customer_id, t.status, $3, $4, t.amount,
                  t.template, t.skip_reason, t.skip_detail, t.raw_value, t.currency,
                  t.period_start, t.period_end, t.aggregates::jsonb, $5, t.branch,
                  t.explanation, $6, $7,
                  CASE WHEN t.status = 'ISSUED' THEN $7::timestamptz END,
                  CASE WHEN t.status = 'ISSUED' THEN 'automatic' END
             FROM bonus_results_staging t ORDER BY t.n
           ON CONFLICT (request_pk) DO NOTHING""",
        row.pk, batch_pk, d.result_type.value,
        d.points_target.value if d.points_target else None,
        sorted({spec.kind for spec in compiled.aggregates}), d.revision, now)
    issued = [(r[1], c) for r, c in zip(records, todo, strict=True)
              if c.decision.status is BonusStatus.ISSUED]
    for c in todo:
        status = c.decision.status.value
        written.statuses[status] = written.statuses.get(status, 0) + 1
        written.events_read += c.events_read
    written.customer_ids = {c.customer_id for c in todo}
    if issued:
        await conn.execute(
            """INSERT INTO bonus_ledger (bonus_id, customer_id, definition_id, result_type,
                                         points_target, amount, template, issue_time)
               SELECT t.bonus_id, t.customer_id, $1, $2, $3, t.amount, t.template, $4
                 FROM unnest($5::uuid[], $6::text[], $7::numeric[], $8::text[])
                      AS t(bonus_id, customer_id, amount, template)
               ON CONFLICT (bonus_id) DO NOTHING""",
            d.definition_id, d.result_type.value,
            d.points_target.value if d.points_target else None, now,
            [b for b, _ in issued], [c.customer_id for _, c in issued],
            [c.decision.amount for _, c in issued], [c.decision.template for _, c in issued])
    events = [e for i in keep for e in prepared.events[i]]
    written.outbox_job_ids += (await emit_events(conn, events, now=now))[1]
    written.requests = len(todo)
    return written


# --- results: the approval queue --------------------------------------------------------------


@dataclass(frozen=True)
class ResultRow:
    pk: int
    bonus_id: str
    definition_id: str
    customer_id: str
    status: BonusStatus
    result_type: str
    points_target: str | None
    amount: Decimal | None
    template: str | None
    skip_reason: str | None
    skip_detail: str | None
    raw_value: str | None
    currency: str | None
    period_start: datetime | None
    period_end: datetime | None
    aggregates: list[dict[str, Any]]
    aggregate_kinds: list[str]
    branch: str | None
    explanation: str
    definition_revision: int
    calculation_count: int
    calculate_time: datetime
    decide_time: datetime | None
    decided_by: str | None
    reject_reason: str | None
    source: str = "api"


_RESULT_SELECT = """SELECT r.*, d.definition_id, q.source FROM bonus_results r
                      JOIN bonus_definitions d ON d.id = r.definition_pk
                      JOIN bonus_requests q ON q.id = r.request_pk"""


def _result(row: asyncpg.Record) -> ResultRow:
    return ResultRow(
        pk=row["id"], bonus_id=str(row["bonus_id"]), definition_id=row["definition_id"],
        customer_id=row["customer_id"], status=BonusStatus(row["status"]),
        result_type=row["result_type"], points_target=row["points_target"],
        amount=row["amount"], template=row["template"], skip_reason=row["skip_reason"],
        skip_detail=row["skip_detail"], raw_value=row["raw_value"], currency=row["currency"],
        period_start=row["period_start"], period_end=row["period_end"],
        aggregates=list(_json(row["aggregates"])), aggregate_kinds=list(row["aggregate_kinds"]),
        branch=row["branch"], explanation=row["explanation"],
        definition_revision=row["definition_revision"],
        calculation_count=row["calculation_count"], calculate_time=row["calculate_time"],
        decide_time=row["decide_time"], decided_by=row["decided_by"],
        reject_reason=row["reject_reason"], source=row["source"])


def _bonus_uuid(bonus_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(bonus_id)
    except ValueError as exc:
        raise InvalidArgument(f"bonus_id {bonus_id!r} is not a bonus id (a UUID)",
                              reason="INVALID_ID", metadata={"field": "bonus_id"}) from exc


def _result_not_found(bonus_id: str) -> NotFound:
    return NotFound(f"no bonus result {bonus_id} (results are purged after "
                    "PROMO_BONUS_RESULT_RETENTION_DAYS, 30 by default)",
                    reason="BONUS_RESULT_NOT_FOUND", metadata={"bonus_id": bonus_id})


async def get_result(conn: asyncpg.Connection, bonus_id: str) -> ResultRow:
    row = await conn.fetchrow(f"{_RESULT_SELECT} WHERE r.bonus_id = $1", _bonus_uuid(bonus_id))
    if row is None:
        raise _result_not_found(bonus_id)
    return _result(row)


@dataclass(frozen=True)
class ResultFilter:
    definition_pk: int | None = None
    statuses: tuple[BonusStatus, ...] = ()
    customer_id: str | None = None
    calculated_after: datetime | None = None
    calculated_before: datetime | None = None


async def list_results(conn: asyncpg.Connection, f: ResultFilter, *, before_pk: int | None,
                       limit: int) -> list[ResultRow]:
    """Newest first (by id), strictly before ``before_pk``."""
    rows = await conn.fetch(
        f"""{_RESULT_SELECT}
             WHERE ($1::bigint IS NULL OR r.definition_pk = $1)
               AND (cardinality($2::text[]) = 0 OR r.status = ANY($2::text[]))
               AND ($3::text IS NULL OR r.customer_id = $3)
               AND ($4::timestamptz IS NULL OR r.calculate_time >= $4)
               AND ($5::timestamptz IS NULL OR r.calculate_time < $5)
               AND ($6::bigint IS NULL OR r.id < $6)
             ORDER BY r.id DESC LIMIT $7""",
        f.definition_pk, [s.value for s in f.statuses], f.customer_id, f.calculated_after,
        f.calculated_before, before_pk, limit)
    return [_result(row) for row in rows]


async def result_events(conn: asyncpg.Connection, result: ResultRow, *,
                        limit: int = 500) -> list[EventRecord]:
    """The events the result was calculated from (seed 004: "the underlying transactions used
    in the calculation"): the customer's events in the result's period that one of its
    formula's aggregates reads, its ``where`` filters included (a Roulette bet excluded by
    ``game_category != "Roulette"`` is not shown), with their attributes as recorded (text: a
    game id "007" stays "007"). A result of an earlier formula revision (not recalculated since
    the edit) shows the events of the kinds it read: its filters are no longer known."""
    if result.period_start is None or result.period_end is None or not result.aggregate_kinds:
        return []
    records = await aggregates_repo.event_records(conn, [result.customer_id],
                                                  result.period_start, result.period_end,
                                                  typed=False)
    kinds = set(result.aggregate_kinds)
    shown = [record for _, record in records if record.kind in kinds]
    current = await conn.fetchrow(
        "SELECT revision, formula_stored FROM bonus_definitions WHERE definition_id = $1",
        result.definition_id)
    if current is None or current["revision"] != result.definition_revision:
        return shown[:limit]
    specs = CompiledFormula.from_stored(_json(current["formula_stored"])).aggregates
    by_kind: dict[str, list[AggregateSpec]] = {}
    for spec in specs:
        by_kind.setdefault(spec.kind, []).append(spec)
    used = []
    for record in shown:
        # Filters compare attributes as formulas read them (numeric text is a number).
        typed = replace(record, attributes=typed_attributes(
            {k: v for k, v in record.attributes.items() if isinstance(v, str)}))
        if any(all(filter_matches(f, typed) for f in spec.filters)
               for spec in by_kind.get(record.kind, ())):
            used.append(record)
            if len(used) == limit:
                break
    return used


@dataclass
class Decided:
    results: list[ResultRow]
    outbox_job_ids: list[int]


async def decide_results(conn: asyncpg.Connection, bonus_ids: Sequence[str],
                         target: BonusStatus, *, now: datetime, decided_by: str,
                         reason: str = "") -> Decided:
    """Approve (ISSUED: ledger + Issued event) or reject CALCULATED results, all or none.
    Run inside the caller's transaction."""
    uuids = [_bonus_uuid(b) for b in bonus_ids]
    rows = {str(r["bonus_id"]): r for r in await conn.fetch(
        """SELECT id, bonus_id, status FROM bonus_results WHERE bonus_id = ANY($1::uuid[])
            ORDER BY id FOR UPDATE""", uuids)}
    for bonus_id in bonus_ids:
        found = rows.get(str(_bonus_uuid(bonus_id)))
        if found is None:
            raise _result_not_found(bonus_id)
        check_decision(bonus_id, BonusStatus(found["status"]), target)
    await conn.execute(
        """UPDATE bonus_results SET status = $2, decide_time = $3, decided_by = $4,
                  reject_reason = nullif($5, '')
            WHERE bonus_id = ANY($1::uuid[])""",
        uuids, target.value, now, decided_by, reason)
    decided = Decided(results=[], outbox_job_ids=[])
    definitions: dict[str, DefinitionRow] = {}
    for bonus_id in bonus_ids:
        result = await get_result(conn, bonus_id)
        decided.results.append(result)
        if target is not BonusStatus.ISSUED:
            continue
        if result.definition_id not in definitions:
            definitions[result.definition_id] = await get_definition(conn, result.definition_id)
        d = definitions[result.definition_id].definition
        await _ledger(conn, d, result, now=now)
        decided.outbox_job_ids += await _emit(
            conn, d, bonus_id=result.bonus_id, customer_id=result.customer_id,
            status=BonusStatus.ISSUED, result_type=result.result_type, amount=result.amount,
            template=result.template, currency=result.currency, skip_reason=None, skip_detail=None,
            period_start=result.period_start, period_end=result.period_end,
            requires_approval=False, now=now, dedup="issued")
    return decided


@dataclass(frozen=True)
class Recalculated:
    recalculated: int
    calculated: int
    skipped: int
    outbox_job_ids: list[int]


async def recalculate(conn: asyncpg.Connection, row: DefinitionRow, *,
                      now: datetime) -> Recalculated:
    """Compute every SKIPPED or CALCULATED result of the definition again with its current
    formula and settings, in place (same bonus id), in the caller's transaction. Results stay
    in the queue (CALCULATED) even if approval is automatic now: only new results are issued
    without an operator. A changed result is told again (a new Calculated / Skipped event)."""
    results = await conn.fetch(
        """SELECT r.id, r.bonus_id, r.request_pk, r.customer_id, r.calculation_count,
                  q.period_start, q.period_end, q.period_revision, q.request_time, q.source
             FROM bonus_results r JOIN bonus_requests q ON q.id = r.request_pk
            WHERE r.definition_pk = $1 AND r.status = ANY($2::text[])
            ORDER BY r.id FOR UPDATE OF r""",
        row.pk, [s.value for s in RECALCULABLE])
    if not results:
        return Recalculated(0, 0, 0, [])
    compiled = row.compiled()
    by_request = {r["request_pk"]: r for r in results}
    pending = await _current_windows(conn, row.definition, [
        {**dict(r), "id": r["request_pk"]} for r in results])
    computed = [c async for chunk in _compute(conn, row, compiled, pending, ApprovalMode.MANUAL)
                for c in chunk]
    d = row.definition
    counts = {BonusStatus.CALCULATED: 0, BonusStatus.SKIPPED: 0}
    job_ids: list[int] = []
    for c in computed:
        current = by_request[c.request_pk]
        count = current["calculation_count"] + 1
        status = c.decision.status
        counts[status] += 1
        await conn.execute(
            """UPDATE bonus_results
                  SET status = $2, amount = $3, template = $4, skip_reason = $5,
                      skip_detail = $6, raw_value = $7, aggregates = $8::jsonb,
                      aggregate_kinds = $9, branch = $10, explanation = $11,
                      definition_revision = $12, calculation_count = $13, calculate_time = $14,
                      result_type = $15, points_target = $16, currency = $17,
                      period_start = $18, period_end = $19,
                      batch_pk = NULL  -- computed here, not by a batch (storage.retention)
                WHERE id = $1""",
            current["id"], status.value, c.decision.amount, c.decision.template,
            c.decision.skip_reason, c.decision.skip_detail, _raw(c.evaluation),
            _aggregates_json(compiled, c.evaluation),
            sorted({spec.kind for spec in compiled.aggregates}), c.evaluation.branch,
            c.evaluation.explain(), d.revision, count, now, d.result_type.value,
            d.points_target.value if d.points_target else None, _currency(d, c.currency),
            c.period_start, c.period_end)
        job_ids += await _emit(
            conn, d, bonus_id=str(current["bonus_id"]), customer_id=c.customer_id,
            status=status, result_type=d.result_type.value, amount=c.decision.amount,
            template=c.decision.template, currency=_currency(d, c.currency),
            skip_reason=c.decision.skip_reason,
            skip_detail=c.decision.skip_detail, period_start=c.period_start,
            period_end=c.period_end, requires_approval=True, now=now,
            dedup=f"{status.value.lower()}:{count}")
    return Recalculated(len(computed), counts[BonusStatus.CALCULATED],
                        counts[BonusStatus.SKIPPED], job_ids)


# --- batches, ledger, retention ----------------------------------------------------------------


async def list_batches(conn: asyncpg.Connection, *, definition_pk: int | None,
                       before_pk: int | None, limit: int) -> list[asyncpg.Record]:
    return list(await conn.fetch(
        """SELECT b.*, d.definition_id FROM bonus_batches b
             JOIN bonus_definitions d ON d.id = b.definition_pk
            WHERE ($1::bigint IS NULL OR b.definition_pk = $1)
              AND ($2::bigint IS NULL OR b.id < $2)
            ORDER BY b.id DESC LIMIT $3""", definition_pk, before_pk, limit))


async def list_ledger(conn: asyncpg.Connection, customer_id: str, *, before_pk: int | None,
                      limit: int) -> list[asyncpg.Record]:
    """Newest first."""
    return list(await conn.fetch(
        """SELECT * FROM bonus_ledger WHERE customer_id = $1
              AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3""",
        customer_id, before_pk, limit))
