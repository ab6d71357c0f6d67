"""BonusService: dynamic reward definitions, calculation requests and the approval queue.

Thin: protobuf <-> core.bonuses / storage.bonuses. Outbox jobs written by a call (the batch job,
webhook deliveries of Issued events) are queued right after its transaction commits; the
worker's sweeper covers Redis being down.
"""

from __future__ import annotations

import logging
import uuid
from dataclasses import replace
from datetime import datetime, time
from typing import Any

import asyncpg
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.message import Message
from grpc import aio

from core.bonuses.definitions import (
    ApprovalMode,
    BonusDefinition,
    DataMode,
    DefinitionVariable,
    PointsTarget,
    ResultType,
    apply_update,
    parse_variable,
    validate_definition,
)
from core.bonuses.results import BonusStatus
from core.bonuses.rules import (
    RULE_COUNTING_FIELDS,
    RULE_UPDATABLE,
    SCHEDULE_TIMING_FIELDS,
    SCHEDULE_UPDATABLE,
    PeriodMode,
    Qualification,
    Rule,
    Schedule,
    api_request_key,
    check_api_request_id,
    check_update_mask,
    compile_filter,
    validate_rule,
    validate_schedule,
)
from core.errors import InvalidArgument
from core.formula import FORMULA_LANGUAGE_VERSION
from core.money import format_decimal, parse_decimal, plain
from core.pagination import effective_page_size
from core.periods import FixedPeriod, Period, RelativePeriod, TimeBackPeriod, load_time_zone
from core.rounding import RoundingMode
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import bonuses_pb2_grpc as pb_grpc
from promo.v1 import formulas_pb2 as fpb
from server.auth import current_principal
from server.convert import read_timestamp, required_id, run_request_once, timestamp
from server.deps import Dependencies
from server.formulas import RELATIVE_FROM_PB, period_from_pb
from server.page_bytes import fit_page
from server.page_tokens import decode_page_token, encode_page_token
from server.promotion_convert import ROUNDING_FROM_PB, ROUNDING_TO_PB
from storage import bonus_triggers as triggers_repo
from storage import bonuses as repo
from storage import customers as customers_repo
from storage.queue import queue_after_commit, queue_deliveries_after_commit

log = logging.getLogger("promo.bonuses")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["BonusService"].full_name
_ADMIN = ("CreateBonusDefinition", "GetBonusDefinition", "ListBonusDefinitions",
          "UpdateBonusDefinition", "ListBonusResults", "GetBonusResult", "ApproveBonusResults",
          "RejectBonusResults", "RecalculateBonusResults", "ListBonusBatches",
          "ListCustomerBonusLedger", "CreateBonusRule", "GetBonusRule", "ListBonusRules",
          "CreateBonusSchedule", "GetBonusSchedule", "ListBonusSchedules", "UpdateBonusRule",
          "UpdateBonusSchedule")
ROLES = {f"/{SERVICE_NAME}/{m}": {"admin"} for m in _ADMIN}
ROLES[f"/{SERVICE_NAME}/RequestBonusCalculation"] = {"admin", "runtime"}

MAX_CUSTOMERS_PER_REQUEST = 10_000
MAX_DECISIONS = 1000

_RESULT_TYPE = {pb.BONUS_RESULT_TYPE_AMOUNT: ResultType.AMOUNT,
                pb.BONUS_RESULT_TYPE_BONUS_TEMPLATE: ResultType.BONUS_TEMPLATE,
                pb.BONUS_RESULT_TYPE_POINTS: ResultType.POINTS,
                pb.BONUS_RESULT_TYPE_GEMS: ResultType.GEMS,
                pb.BONUS_RESULT_TYPE_DIAMONDS: ResultType.DIAMONDS}
_RESULT_TYPE_PB = {v: k for k, v in _RESULT_TYPE.items()}
_RESULT_TYPE_NAME_PB = {v.value: k for k, v in _RESULT_TYPE.items()}
_TARGET = {pb.POINTS_TARGET_BALANCE: PointsTarget.BALANCE,
           pb.POINTS_TARGET_LEADERBOARD: PointsTarget.LEADERBOARD,
           pb.POINTS_TARGET_LEVEL_PROGRESS: PointsTarget.LEVEL_PROGRESS}
_TARGET_PB = {v: k for k, v in _TARGET.items()}
_TARGET_NAME_PB = {v.value: k for k, v in _TARGET.items()}
_DATA_MODE = {pb.BONUS_DATA_MODE_TRANSACTIONS_AND_PROPERTIES: DataMode.TRANSACTIONS_AND_PROPERTIES,
              pb.BONUS_DATA_MODE_PROPERTIES_ONLY: DataMode.PROPERTIES_ONLY}
_DATA_MODE_PB = {v: k for k, v in _DATA_MODE.items()}
_APPROVAL = {pb.APPROVAL_MODE_AUTOMATIC: ApprovalMode.AUTOMATIC,
             pb.APPROVAL_MODE_MANUAL: ApprovalMode.MANUAL}
_APPROVAL_PB = {v: k for k, v in _APPROVAL.items()}
_STATUS = {pb.BONUS_STATUS_SKIPPED: BonusStatus.SKIPPED,
           pb.BONUS_STATUS_CALCULATED: BonusStatus.CALCULATED,
           pb.BONUS_STATUS_ISSUED: BonusStatus.ISSUED,
           pb.BONUS_STATUS_REJECTED: BonusStatus.REJECTED}
_STATUS_PB = {v: k for k, v in _STATUS.items()}
_RELATIVE_PB = {v: k for k, v in RELATIVE_FROM_PB.items()}
_UNITS_PB = {"hours": fpb.TIME_UNIT_HOURS, "days": fpb.TIME_UNIT_DAYS}
_PERIOD_MODE = {pb.RULE_PERIOD_MODE_DEFINITION: PeriodMode.DEFINITION,
                pb.RULE_PERIOD_MODE_FIRST_TO_LAST: PeriodMode.FIRST_TO_LAST,
                pb.RULE_PERIOD_MODE_QUALIFICATION_TO_LAST: PeriodMode.QUALIFICATION_TO_LAST,
                pb.RULE_PERIOD_MODE_FIRST_TO_FIXED_END: PeriodMode.FIRST_TO_FIXED_END,
                pb.RULE_PERIOD_MODE_QUALIFICATION_TO_FIXED_END:
                    PeriodMode.QUALIFICATION_TO_FIXED_END}
_PERIOD_MODE_PB = {v: k for k, v in _PERIOD_MODE.items()}


def _required(mapping: dict[int, Any], value: int, field: str, names: str) -> Any:
    found = mapping.get(value)
    if found is None:
        raise InvalidArgument(f"{field} is required: one of {names}", reason="MISSING_FIELD",
                              metadata={"field": field})
    return found


def _names(mapping: dict[Any, Any]) -> str:
    return ", ".join(m.value for m in mapping.values())


def to_domain(m: pb.BonusDefinition, *, default_decimals: bool = True) -> BonusDefinition:
    """The message as a definition (not validated yet; validate_definition does that).

    ``default_decimals``: without rounding, decimals 0 (unset) becomes 2. Only for a create: an
    update's message leaves fields outside its mask unset, so there an explicit 0 would be
    mistaken for "unset" (and the update applies only the masked fields anyway)."""
    data_mode = _required(_DATA_MODE, m.data_mode, "data_mode", _names(_DATA_MODE))
    rounding = ROUNDING_FROM_PB.get(m.rounding, "NONE")
    decimals = m.decimals
    if default_decimals and not decimals and rounding == "NONE":
        decimals = 2
    return BonusDefinition(
        definition_id=m.definition_id, display_name=m.display_name, formula=m.formula,
        result_type=_required(_RESULT_TYPE, m.result_type, "result_type", _names(_RESULT_TYPE)),
        points_target=_TARGET.get(m.points_target),
        min_allowed=parse_decimal(m.min_allowed, field="min_allowed", allow_empty=True),
        cap_amount=parse_decimal(m.cap_amount, field="cap_amount", allow_empty=True),
        rounding=RoundingMode[rounding],
        decimals=decimals,
        rounding_factor=parse_decimal(m.rounding_factor, field="rounding_factor",
                                      allow_empty=True),
        data_mode=data_mode,
        period=period_from_pb(m.period) if m.HasField("period") else None,
        approval_mode=_required(_APPROVAL, m.approval_mode, "approval_mode", _names(_APPROVAL)),
        batch_window_seconds=m.batch_window_seconds or None,
        skipped_message=m.skipped_message, calculated_message=m.calculated_message,
        issued_message=m.issued_message,
        variables=tuple(parse_variable(i, v.name, v.value, v.per_currency)
                        for i, v in enumerate(m.variables)))


def _variable_pb(v: DefinitionVariable) -> fpb.FormulaVariable:
    if v.per_currency:
        return fpb.FormulaVariable(name=v.name, per_currency={
            code: format_decimal(amount) for code, amount in v.per_currency})
    assert v.value is not None
    return fpb.FormulaVariable(name=v.name, value=format_decimal(v.value))


def _period_pb(period: Period | None) -> fpb.TransactionPeriod | None:
    if period is None:
        return None
    if isinstance(period, FixedPeriod):
        return fpb.TransactionPeriod(fixed=fpb.TransactionPeriod.Fixed(
            start=timestamp(period.start), end=timestamp(period.end),
            time_zone=period.time_zone or ""))
    if isinstance(period, TimeBackPeriod):
        return fpb.TransactionPeriod(time_back=fpb.TransactionPeriod.TimeBack(
            amount=period.amount, unit=_UNITS_PB[period.unit]))
    assert isinstance(period, RelativePeriod)
    return fpb.TransactionPeriod(relative=fpb.TransactionPeriod.Relative(
        kind=_RELATIVE_PB[period.kind], time_zone=period.time_zone or ""))


def _money(value: Any) -> str:
    return "" if value is None else format_decimal(plain(value))


def to_pb(d: BonusDefinition) -> pb.BonusDefinition:
    return pb.BonusDefinition(
        definition_id=d.definition_id, display_name=d.display_name, formula=d.formula,
        result_type=_RESULT_TYPE_PB[d.result_type],
        points_target=_TARGET_PB[d.points_target] if d.points_target else 0,
        min_allowed=_money(d.min_allowed), cap_amount=_money(d.cap_amount),
        rounding=ROUNDING_TO_PB[d.rounding.value], decimals=d.decimals,
        rounding_factor=_money(d.rounding_factor), data_mode=_DATA_MODE_PB[d.data_mode],
        period=_period_pb(d.period), approval_mode=_APPROVAL_PB[d.approval_mode],
        batch_window_seconds=d.batch_window_seconds or 0,
        skipped_message=d.skipped_message, calculated_message=d.calculated_message,
        issued_message=d.issued_message, revision=d.revision,
        variables=[_variable_pb(v) for v in d.variables],
        formula_language_version=FORMULA_LANGUAGE_VERSION,
        create_time=timestamp(d.create_time), update_time=timestamp(d.update_time))


def result_to_pb(r: repo.ResultRow) -> pb.BonusResult:
    return pb.BonusResult(
        bonus_id=r.bonus_id, definition_id=r.definition_id, customer_id=r.customer_id,
        status=_STATUS_PB[r.status], result_type=_RESULT_TYPE_NAME_PB.get(r.result_type, 0),
        amount=_money(r.amount), template=r.template or "",
        skip_reason=r.skip_reason or "", skip_detail=r.skip_detail or "",
        raw_value=r.raw_value or "", currency=r.currency or "",
        period_start=timestamp(r.period_start), period_end=timestamp(r.period_end),
        aggregates=[pb.BonusAggregate(key=a["key"], description=a["description"],
                                      value=a["value"] or "", count=a["count"])
                    for a in r.aggregates],
        branch=r.branch or "", explanation=r.explanation,
        definition_revision=r.definition_revision, calculate_time=timestamp(r.calculate_time),
        decide_time=timestamp(r.decide_time), decided_by=r.decided_by or "",
        reject_reason=r.reject_reason or "",
        points_target=_TARGET_NAME_PB.get(r.points_target or "", 0), source=r.source)


def _page_before(token: str, filters: dict[str, Any]) -> int | None:
    cursor = decode_page_token(token, filters, key=(int,))
    return None if cursor is None else int(cursor.after[0])


def _check_ids(ids: list[str], field: str, limit: int) -> list[str]:
    if not ids:
        raise InvalidArgument(f"{field} must name at least one", reason="MISSING_FIELD",
                              metadata={"field": field})
    if len(ids) > limit:
        raise InvalidArgument(f"{field}: at most {limit} per call, got {len(ids)}",
                              reason="TOO_MANY_ITEMS", metadata={"field": field})
    if len(set(ids)) != len(ids):
        raise InvalidArgument(f"{field} names an id more than once", reason="DUPLICATE_ID",
                              metadata={"field": field})
    return ids


def _canonical_bonus_ids(ids: list[str]) -> list[str]:
    """Bonus ids in the one form uuid.UUID writes (lower case, hyphens), so the duplicate check
    sees one result named twice in different case or spelling; a non-UUID is INVALID_ID."""
    canonical = []
    for bonus_id in ids:
        try:
            canonical.append(str(uuid.UUID(bonus_id)))
        except ValueError as exc:
            raise InvalidArgument(f"bonus_ids: {bonus_id!r} is not a bonus id (a UUID)",
                                  reason="INVALID_ID", metadata={"field": "bonus_ids"}) from exc
    return canonical


def rule_from_pb(m: pb.BonusRule) -> Rule:
    required_id(m.definition_id, "definition_id")
    qualification = None
    if m.qualification_kind:
        qualification = Qualification(
            kind=m.qualification_kind,
            min_amount=parse_decimal(m.qualification_min_amount,
                                     field="qualification_min_amount", allow_empty=True),
            filters=compile_filter(m.qualification_kind, m.qualification_filter,
                                   field="qualification_filter"),
            currency=m.qualification_currency or None)
    elif m.qualification_min_amount or m.qualification_filter or m.qualification_currency:
        raise InvalidArgument("qualification_kind is required with a qualification amount, "
                              "currency or filter", reason="MISSING_FIELD",
                              metadata={"field": "qualification_kind"})
    return validate_rule(Rule(
        rule_id=m.rule_id, definition_id=m.definition_id, event_kind=m.event_kind,
        every=m.every,
        filters=compile_filter(m.event_kind, m.filter, field="filter") if m.event_kind else (),
        qualification=qualification, max_executions=m.max_executions or None,
        period_mode=_PERIOD_MODE.get(m.period_mode, PeriodMode.DEFINITION),
        period_end=(read_timestamp(m.period_end, "period_end")
                    if m.HasField("period_end") else None)))


def rule_to_pb(r: triggers_repo.RuleRow) -> pb.BonusRule:
    q = r.rule.qualification
    return pb.BonusRule(
        rule_id=r.rule.rule_id, definition_id=r.rule.definition_id,
        event_kind=r.rule.event_kind, filter=r.event_filter, every=r.rule.every,
        qualification_kind=q.kind if q else "",
        qualification_min_amount=_money(q.min_amount) if q else "",
        qualification_filter=r.qualification_filter,
        qualification_currency=(q.currency or "") if q else "",
        max_executions=r.rule.max_executions or 0,
        period_mode=_PERIOD_MODE_PB[r.rule.period_mode],
        period_end=timestamp(r.rule.period_end), create_time=timestamp(r.create_time),
        active=r.rule.active)


def schedule_from_pb(m: pb.BonusSchedule) -> Schedule:
    try:
        local = time.fromisoformat(m.local_time)
    except ValueError as exc:
        raise InvalidArgument(f"local_time must be HH:MM, got {m.local_time!r}",
                              reason="INVALID_TIME", metadata={"field": "local_time"}) from exc
    required_id(m.definition_id, "definition_id")
    return validate_schedule(Schedule(
        schedule_id=m.schedule_id, definition_id=m.definition_id,
        customer_ids=tuple(m.customer_ids), weekday=m.weekday or None, local_time=local,
        time_zone=m.time_zone or "UTC", campaign_id=m.campaign_id or None,
        since_campaign_entrance=m.since_campaign_entrance))


def schedule_to_pb(r: triggers_repo.ScheduleRow) -> pb.BonusSchedule:
    s = r.schedule
    return pb.BonusSchedule(
        schedule_id=s.schedule_id, definition_id=s.definition_id,
        customer_ids=list(s.customer_ids), weekday=s.weekday or 0,
        local_time=s.local_time.strftime("%H:%M"), time_zone=s.time_zone,
        next_run_time=timestamp(r.next_run_at), last_run_time=timestamp(r.last_run_at),
        active=s.active, campaign_id=s.campaign_id or "",
        since_campaign_entrance=s.since_campaign_entrance)


def _merged(current: Message, given: Message, paths: list[str]) -> Any:
    """``current`` with the masked fields taken from ``given`` (a masked field ``given`` leaves
    unset is cleared; a repeated one is replaced, not appended to)."""
    merged = type(current)()
    merged.CopyFrom(current)
    FieldMask(paths=paths).MergeMessage(given, merged, replace_message_field=True,
                                        replace_repeated_field=True)
    return merged


def _changed(before: Message, after: Message, fields: frozenset[str]) -> bool:
    return any(getattr(before, name) != getattr(after, name) for name in fields)


class TriggerServicer:
    """The trigger RPCs, mixed into BonusServicer."""

    _pool: asyncpg.Pool
    _deps: Dependencies

    async def CreateBonusRule(self, request: pb.CreateBonusRuleRequest,
                              context: aio.ServicerContext) -> pb.CreateBonusRuleResponse:
        rule = rule_from_pb(request.rule)
        now = self._deps.clock.now()

        async def work(conn: asyncpg.Connection) -> bytes:
            row = await triggers_repo.insert_rule(conn, rule, event_filter=request.rule.filter,
                                         qualification_filter=request.rule.qualification_filter,
                                         now=now)
            return pb.CreateBonusRuleResponse(rule=rule_to_pb(row)).SerializeToString()

        raw = await run_request_once(self._pool, "CreateBonusRule", request, work)
        return pb.CreateBonusRuleResponse.FromString(raw)

    async def GetBonusRule(self, request: pb.GetBonusRuleRequest,
                           context: aio.ServicerContext) -> pb.GetBonusRuleResponse:
        async with self._pool.acquire() as conn:
            row = await triggers_repo.get_rule(conn, required_id(request.rule_id, "rule_id"))
        return pb.GetBonusRuleResponse(rule=rule_to_pb(row))

    async def ListBonusRules(self, request: pb.ListBonusRulesRequest,
                             context: aio.ServicerContext) -> pb.ListBonusRulesResponse:
        size = effective_page_size(request.page_size)
        cursor = decode_page_token(request.page_token, {}, key=(str,))
        after = str(cursor.after[0]) if cursor else None
        async with self._pool.acquire() as conn:
            rows = await triggers_repo.list_rules(conn, after_id=after, limit=size + 1)
        page, rules, more = fit_page(rows[:size], len(rows) > size, rule_to_pb)
        token = encode_page_token([page[-1].rule.rule_id], {}) if more else ""
        return pb.ListBonusRulesResponse(rules=rules, next_page_token=token)

    async def UpdateBonusRule(self, request: pb.UpdateBonusRuleRequest,
                              context: aio.ServicerContext) -> pb.UpdateBonusRuleResponse:
        paths = check_update_mask(list(request.update_mask.paths), RULE_UPDATABLE)
        rule_id = required_id(request.rule.rule_id, "rule_id")

        async def work(conn: asyncpg.Connection) -> bytes:
            current = await triggers_repo.get_rule(conn, rule_id, for_update=True)
            before = rule_to_pb(current)
            edited: pb.BonusRule = _merged(before, request.rule, paths)
            rule = replace(rule_from_pb(edited), active=edited.active)  # as create checks it
            row = await triggers_repo.update_rule(
                conn, current.pk, rule, event_filter=edited.filter,
                qualification_filter=edited.qualification_filter,
                reset_counts=_changed(before, edited, RULE_COUNTING_FIELDS))
            return pb.UpdateBonusRuleResponse(rule=rule_to_pb(row)).SerializeToString()

        raw = await run_request_once(self._pool, "UpdateBonusRule", request, work)
        return pb.UpdateBonusRuleResponse.FromString(raw)

    async def UpdateBonusSchedule(self, request: pb.UpdateBonusScheduleRequest,
                                  context: aio.ServicerContext
                                  ) -> pb.UpdateBonusScheduleResponse:
        paths = check_update_mask(list(request.update_mask.paths), SCHEDULE_UPDATABLE)
        schedule_id = required_id(request.schedule.schedule_id, "schedule_id")
        now = self._deps.clock.now()

        async def work(conn: asyncpg.Connection) -> bytes:
            current = await triggers_repo.get_schedule(conn, schedule_id, for_update=True)
            before = schedule_to_pb(current)
            edited: pb.BonusSchedule = _merged(before, request.schedule, paths)
            schedule = replace(schedule_from_pb(edited), active=edited.active)
            row = await triggers_repo.update_schedule(
                conn, current, schedule, retime=_changed(before, edited, SCHEDULE_TIMING_FIELDS),
                now=now)
            return pb.UpdateBonusScheduleResponse(
                schedule=schedule_to_pb(row)).SerializeToString()

        raw = await run_request_once(self._pool, "UpdateBonusSchedule", request, work)
        return pb.UpdateBonusScheduleResponse.FromString(raw)

    async def CreateBonusSchedule(self, request: pb.CreateBonusScheduleRequest,
                                  context: aio.ServicerContext
                                  ) -> pb.CreateBonusScheduleResponse:
        schedule = schedule_from_pb(request.schedule)
        now = self._deps.clock.now()

        async def work(conn: asyncpg.Connection) -> bytes:
            row = await triggers_repo.insert_schedule(conn, schedule, now=now)
            return pb.CreateBonusScheduleResponse(
                schedule=schedule_to_pb(row)).SerializeToString()

        raw = await run_request_once(self._pool, "CreateBonusSchedule", request, work)
        return pb.CreateBonusScheduleResponse.FromString(raw)

    async def GetBonusSchedule(self, request: pb.GetBonusScheduleRequest,
                               context: aio.ServicerContext) -> pb.GetBonusScheduleResponse:
        async with self._pool.acquire() as conn:
            row = await triggers_repo.get_schedule(
                conn, required_id(request.schedule_id, "schedule_id"))
        return pb.GetBonusScheduleResponse(schedule=schedule_to_pb(row))

    async def ListBonusSchedules(self, request: pb.ListBonusSchedulesRequest,
                                 context: aio.ServicerContext) -> pb.ListBonusSchedulesResponse:
        size = effective_page_size(request.page_size)
        cursor = decode_page_token(request.page_token, {}, key=(str,))
        after = str(cursor.after[0]) if cursor else None
        async with self._pool.acquire() as conn:
            rows = await triggers_repo.list_schedules(conn, after_id=after, limit=size + 1)
        page, schedules, more = fit_page(rows[:size], len(rows) > size, schedule_to_pb)
        token = encode_page_token([page[-1].schedule.schedule_id], {}) if more else ""
        return pb.ListBonusSchedulesResponse(schedules=schedules, next_page_token=token)


class BonusServicer(TriggerServicer, pb_grpc.BonusServiceServicer):
    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps
        self._pool: asyncpg.Pool = deps.pool

    async def _queue(self, job_ids: list[int], due: datetime) -> None:
        for job_id in job_ids:
            await queue_after_commit(self._deps.redis, job_id=job_id, due_at=due,
                                     queue_name=self._deps.queue_name)

    async def _queue_deliveries(self, job_ids: list[int], due: datetime) -> None:
        """An approval's or a recalculation's event deliveries (up to one per result): a few
        claimers, not one arq job each (storage.queue.queue_deliveries_after_commit)."""
        settings = self._deps.settings
        await queue_deliveries_after_commit(
            self._deps.redis, job_ids=job_ids, due_at=due, queue_name=self._deps.queue_name,
            worker_max_jobs=settings.worker_max_jobs if settings is not None else 20)

    # --- definitions ---

    async def CreateBonusDefinition(self, request: pb.CreateBonusDefinitionRequest,
                                    context: aio.ServicerContext
                                    ) -> pb.CreateBonusDefinitionResponse:
        required_id(request.definition.definition_id, "definition_id")
        definition, compiled = validate_definition(to_domain(request.definition))
        now = self._deps.clock.now()

        async def work(conn: asyncpg.Connection) -> bytes:
            row = await repo.insert_definition(conn, definition, compiled, now=now)
            return pb.CreateBonusDefinitionResponse(
                definition=to_pb(row.definition)).SerializeToString()

        raw = await run_request_once(self._pool, "CreateBonusDefinition", request, work)
        return pb.CreateBonusDefinitionResponse.FromString(raw)

    async def GetBonusDefinition(self, request: pb.GetBonusDefinitionRequest,
                                 context: aio.ServicerContext) -> pb.GetBonusDefinitionResponse:
        definition_id = required_id(request.definition_id, "definition_id")
        async with self._pool.acquire() as conn:
            row = await repo.get_definition(conn, definition_id)
        return pb.GetBonusDefinitionResponse(definition=to_pb(row.definition))

    async def ListBonusDefinitions(self, request: pb.ListBonusDefinitionsRequest,
                                   context: aio.ServicerContext
                                   ) -> pb.ListBonusDefinitionsResponse:
        size = effective_page_size(request.page_size)
        cursor = decode_page_token(request.page_token, {}, key=(str,))
        after = str(cursor.after[0]) if cursor else None
        async with self._pool.acquire() as conn:
            rows = await repo.list_definitions(conn, after_id=after, limit=size + 1)
        page, definitions, more = fit_page(rows[:size], len(rows) > size,
                                           lambda r: to_pb(r.definition))
        token = encode_page_token([page[-1].definition.definition_id], {}) if more else ""
        return pb.ListBonusDefinitionsResponse(definitions=definitions, next_page_token=token)

    async def UpdateBonusDefinition(self, request: pb.UpdateBonusDefinitionRequest,
                                    context: aio.ServicerContext
                                    ) -> pb.UpdateBonusDefinitionResponse:
        paths = list(request.update_mask.paths)
        definition_id = required_id(request.definition.definition_id, "definition_id")
        message = pb.BonusDefinition()
        message.CopyFrom(request.definition)
        # Fields outside the mask may be left unset: give the enums a value to_domain accepts.
        for name, default in (("data_mode", pb.BONUS_DATA_MODE_TRANSACTIONS_AND_PROPERTIES),
                              ("result_type", pb.BONUS_RESULT_TYPE_AMOUNT),
                              ("approval_mode", pb.APPROVAL_MODE_MANUAL)):
            if name not in paths and not getattr(message, name):
                setattr(message, name, default)
        patch = to_domain(message, default_decimals=False)
        now = self._deps.clock.now()

        async def work(conn: asyncpg.Connection) -> bytes:
            current = await repo.get_definition(conn, definition_id, for_update=True)
            updated = apply_update(current.definition,
                                   replace(patch, definition_id=current.definition.definition_id),
                                   paths)
            checked, compiled = validate_definition(updated)
            saved = await repo.update_definition(conn, current.pk, checked, compiled, now=now)
            return pb.UpdateBonusDefinitionResponse(
                definition=to_pb(saved.definition)).SerializeToString()

        raw = await run_request_once(self._pool, "UpdateBonusDefinition", request, work)
        return pb.UpdateBonusDefinitionResponse.FromString(raw)

    # --- requests ---

    async def RequestBonusCalculation(self, request: pb.RequestBonusCalculationRequest,
                                      context: aio.ServicerContext
                                      ) -> pb.RequestBonusCalculationResponse:
        definition_id = required_id(request.definition_id, "definition_id")
        check_api_request_id(request.request_id)  # never a trigger's request key
        customers = _check_ids(list(request.customer_ids), "customer_ids",
                               MAX_CUSTOMERS_PER_REQUEST)
        period = None
        if request.HasField("period_start") or request.HasField("period_end"):
            if not (request.HasField("period_start") and request.HasField("period_end")):
                raise InvalidArgument("give both period_start and period_end, or neither",
                                      reason="INVALID_PERIOD",
                                      metadata={"field": "period_end"})
            start = read_timestamp(request.period_start, "period_start")
            end = read_timestamp(request.period_end, "period_end")
            if request.time_zone:
                # Both ends in one zone: FixedPeriod measures them on its wall clock.
                zone = load_time_zone(request.time_zone)
                try:
                    start, end = start.astimezone(zone), end.astimezone(zone)
                except OverflowError:  # within hours of year 1 or 9999: no such local time
                    raise InvalidArgument(
                        f"the period cannot be shown in {request.time_zone}: it is at the "
                        "edge of the calendar", reason="INVALID_PERIOD",
                        metadata={"field": "time_zone"}) from None
            fixed = FixedPeriod(start, end)
            period = (fixed.start, fixed.end)
        elif request.time_zone:
            raise InvalidArgument("time_zone measures an explicit period: give it with "
                                  "period_start and period_end, or leave it empty",
                                  reason="INVALID_PERIOD", metadata={"field": "time_zone"})
        now = self._deps.clock.now()
        settings = self._deps.settings
        default_window = settings.bonus_batch_window_seconds if settings else 300
        jobs: list[tuple[int, datetime]] = []

        async def work(conn: asyncpg.Connection) -> bytes:
            row = await repo.get_definition(conn, definition_id)
            if period is not None and row.definition.data_mode is DataMode.PROPERTIES_ONLY:
                raise InvalidArgument(
                    f"definition {definition_id!r} reads customer properties only: "
                    "it takes no period_start / period_end", reason="INVALID_PERIOD",
                    metadata={"field": "period_start"})
            accepted = await repo.add_requests(
                conn, row, [repo.NewRequest(c, api_request_key(request.request_id, c), period)
                            for c in customers], now=now, default_window=default_window)
            if accepted.outbox_job_id is not None:
                jobs.append((accepted.outbox_job_id, accepted.due_at))
            return pb.RequestBonusCalculationResponse(
                window_start=timestamp(accepted.window_start),
                due_time=timestamp(accepted.due_at),
                accepted_count=accepted.accepted).SerializeToString()

        raw = await run_request_once(self._pool, "RequestBonusCalculation", request, work)
        for job_id, due in jobs:
            await self._queue([job_id], due)
        return pb.RequestBonusCalculationResponse.FromString(raw)

    # --- the approval queue ---

    async def ListBonusResults(self, request: pb.ListBonusResultsRequest,
                               context: aio.ServicerContext) -> pb.ListBonusResultsResponse:
        size = effective_page_size(request.page_size)
        statuses = tuple(_required(_STATUS, s, "statuses", _names(_STATUS))
                         for s in request.statuses)
        after = (read_timestamp(request.calculated_after, "calculated_after")
                 if request.HasField("calculated_after") else None)
        before = (read_timestamp(request.calculated_before, "calculated_before")
                  if request.HasField("calculated_before") else None)
        filters = {"definition_id": request.definition_id,
                   "statuses": sorted(s.value for s in statuses),
                   "customer_id": request.customer_id, "after": str(after),
                   "before": str(before)}
        before_pk = _page_before(request.page_token, filters)
        async with self._pool.acquire() as conn:
            definition_pk = None
            if request.definition_id:
                definition_pk = (await repo.get_definition(conn, request.definition_id)).pk
            rows = await repo.list_results(
                conn, repo.ResultFilter(definition_pk=definition_pk, statuses=statuses,
                                        customer_id=request.customer_id or None,
                                        calculated_after=after, calculated_before=before),
                before_pk=before_pk, limit=size + 1)
        page, results, more = fit_page(rows[:size], len(rows) > size, result_to_pb)
        token = encode_page_token([page[-1].pk], filters) if more else ""
        return pb.ListBonusResultsResponse(results=results, next_page_token=token)

    async def GetBonusResult(self, request: pb.GetBonusResultRequest,
                             context: aio.ServicerContext) -> pb.GetBonusResultResponse:
        bonus_id = required_id(request.bonus_id, "bonus_id")
        async with self._pool.acquire() as conn:
            result = await repo.get_result(conn, bonus_id)
            events = await repo.result_events(conn, result)
        return pb.GetBonusResultResponse(result=result_to_pb(result), events=[
            pb.BonusEvent(event_id=e.event_id or 0, kind=e.kind,
                          amount=format_decimal(e.amount), currency=e.currency or "",
                          occurred_at=timestamp(e.occurred_at),
                          attributes={k: str(v) for k, v in e.attributes.items()})
            for e in events])

    async def _decide(self, request: Any, target: BonusStatus, scope: str,
                      reason: str = "") -> list[pb.BonusResult]:
        ids = _check_ids(_canonical_bonus_ids(list(request.bonus_ids)), "bonus_ids",
                         MAX_DECISIONS)
        now = self._deps.clock.now()
        who = current_principal.get().name
        jobs: list[int] = []

        async def work(conn: asyncpg.Connection) -> bytes:
            decided = await repo.decide_results(conn, ids, target, now=now, decided_by=who,
                                                reason=reason)
            jobs.extend(decided.outbox_job_ids)
            log.info("bonus results issued" if target is BonusStatus.ISSUED
                     else "bonus results rejected", extra={
                         "bonus_ids": ",".join(r.bonus_id for r in decided.results),
                         "count": len(decided.results), "decided_by": who})
            return pb.ApproveBonusResultsResponse(
                results=[result_to_pb(r) for r in decided.results]).SerializeToString()

        raw = await run_request_once(self._pool, scope, request, work)
        await self._queue_deliveries(jobs, now)
        return list(pb.ApproveBonusResultsResponse.FromString(raw).results)

    async def ApproveBonusResults(self, request: pb.ApproveBonusResultsRequest,
                                  context: aio.ServicerContext
                                  ) -> pb.ApproveBonusResultsResponse:
        results = await self._decide(request, BonusStatus.ISSUED, "ApproveBonusResults")
        return pb.ApproveBonusResultsResponse(results=results)

    async def RejectBonusResults(self, request: pb.RejectBonusResultsRequest,
                                 context: aio.ServicerContext) -> pb.RejectBonusResultsResponse:
        if len(request.reason) > 500:
            raise InvalidArgument("reason is longer than 500 characters",
                                  reason="INVALID_REASON", metadata={"field": "reason"})
        results = await self._decide(request, BonusStatus.REJECTED, "RejectBonusResults",
                                     request.reason)
        return pb.RejectBonusResultsResponse(results=results)

    async def RecalculateBonusResults(self, request: pb.RecalculateBonusResultsRequest,
                                      context: aio.ServicerContext
                                      ) -> pb.RecalculateBonusResultsResponse:
        definition_id = required_id(request.definition_id, "definition_id")
        now = self._deps.clock.now()
        jobs: list[int] = []

        async def work(conn: asyncpg.Connection) -> bytes:
            row = await repo.get_definition(conn, definition_id, for_update=True)
            done = await repo.recalculate(conn, row, now=now)
            jobs.extend(done.outbox_job_ids)
            log.info("bonus results recalculated", extra={
                "definition_id": definition_id, "revision": row.definition.revision,
                "recalculated": done.recalculated, "calculated": done.calculated,
                "skipped": done.skipped})
            return pb.RecalculateBonusResultsResponse(
                recalculated_count=done.recalculated, calculated_count=done.calculated,
                skipped_count=done.skipped).SerializeToString()

        raw = await run_request_once(self._pool, "RecalculateBonusResults", request, work)
        await self._queue_deliveries(jobs, now)
        return pb.RecalculateBonusResultsResponse.FromString(raw)

    # --- cost and ledger ---

    async def ListBonusBatches(self, request: pb.ListBonusBatchesRequest,
                               context: aio.ServicerContext) -> pb.ListBonusBatchesResponse:
        size = effective_page_size(request.page_size)
        filters = {"definition_id": request.definition_id}
        before_pk = _page_before(request.page_token, filters)
        async with self._pool.acquire() as conn:
            definition_pk = None
            if request.definition_id:
                definition_pk = (await repo.get_definition(conn, request.definition_id)).pk
            rows = await repo.list_batches(conn, definition_pk=definition_pk,
                                           before_pk=before_pk, limit=size + 1)
        page, more = rows[:size], len(rows) > size
        token = encode_page_token([page[-1]["id"]], filters) if more else ""
        return pb.ListBonusBatchesResponse(batches=[pb.BonusBatch(
            batch_id=r["id"], definition_id=r["definition_id"],
            window_start=timestamp(r["window_start"]), window_end=timestamp(r["window_end"]),
            request_count=r["request_count"], customer_count=r["customer_count"],
            events_read=r["events_read"], duration_ms=r["duration_ms"],
            finish_time=timestamp(r["finish_time"])) for r in page], next_page_token=token)

    async def ListCustomerBonusLedger(self, request: pb.ListCustomerBonusLedgerRequest,
                                      context: aio.ServicerContext
                                      ) -> pb.ListCustomerBonusLedgerResponse:
        required_id(request.customer_id, "customer_id")
        size = effective_page_size(request.page_size)
        filters = {"customer_id": request.customer_id}
        before_pk = _page_before(request.page_token, filters)
        async with self._pool.acquire() as conn:
            # An unknown customer is NOT_FOUND, as in the other customer-scoped lists (an empty
            # page would hide a mistyped id).
            await customers_repo.get(conn, request.customer_id)
            rows = await repo.list_ledger(conn, request.customer_id, before_pk=before_pk,
                                          limit=size + 1)
        page, more = rows[:size], len(rows) > size
        token = encode_page_token([page[-1]["id"]], filters) if more else ""
        return pb.ListCustomerBonusLedgerResponse(entries=[pb.LedgerEntry(
            entry_id=r["id"], customer_id=r["customer_id"], bonus_id=str(r["bonus_id"]),
            definition_id=r["definition_id"],
            result_type=_RESULT_TYPE_NAME_PB.get(r["result_type"], 0),
            points_target=_TARGET_NAME_PB.get(r["points_target"] or "", 0),
            amount=_money(r["amount"]), template=r["template"] or "",
            source=r["source"], issue_time=timestamp(r["issue_time"])) for r in page],
            next_page_token=token)


def register(server: aio.Server, deps: Dependencies) -> None:
    pb_grpc.add_BonusServiceServicer_to_server(BonusServicer(deps), server)
