"""FormulaService: validate a formula and dry-run it against a customer, saving nothing."""

from __future__ import annotations

from datetime import UTC, tzinfo
from decimal import Decimal

from grpc import aio

from core.bonuses.definitions import MAX_VARIABLES
from core.errors import InvalidArgument
from core.formula import (
    FORMULA_LANGUAGE_VERSION,
    CompiledFormula,
    FormulaInputs,
    Outcome,
    ResultOptions,
    VariableValue,
    compile_formula,
)
from core.money import format_decimal, parse_decimal, shown_number
from core.periods import (
    FixedPeriod,
    Period,
    RelativeKind,
    RelativePeriod,
    TimeBackPeriod,
    load_time_zone,
    resolve_period,
)
from core.rounding import RoundingMode
from promo.v1 import formulas_pb2 as pb
from promo.v1 import formulas_pb2_grpc as pb_grpc
from server.convert import read_timestamp, required_id, timestamp
from server.deps import Dependencies
from server.promotion_convert import ROUNDING_FROM_PB
from storage import aggregates as aggregates_repo
from storage import customers as customers_repo

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["FormulaService"].full_name
ROLES = {f"/{SERVICE_NAME}/ValidateFormula": {"admin"},
         f"/{SERVICE_NAME}/DryRunFormula": {"admin"}}
RELATIVE_FROM_PB = {pb.RELATIVE_KIND_LAST_FULL_DAY: RelativeKind.LAST_FULL_DAY,
                    pb.RELATIVE_KIND_LAST_FULL_WEEK: RelativeKind.LAST_FULL_WEEK,
                    pb.RELATIVE_KIND_LAST_FULL_MONTH: RelativeKind.LAST_FULL_MONTH,
                    pb.RELATIVE_KIND_LAST_WEEKEND: RelativeKind.LAST_WEEKEND,
                    pb.RELATIVE_KIND_TODAY_SO_FAR: RelativeKind.TODAY_SO_FAR}
_NUMBER_START = frozenset("0123456789+-.")
_OUTCOMES = {Outcome.AMOUNT: pb.DRY_RUN_OUTCOME_AMOUNT,
             Outcome.TEMPLATE: pb.DRY_RUN_OUTCOME_TEMPLATE,
             Outcome.SKIPPED: pb.DRY_RUN_OUTCOME_SKIPPED}


def _bad_variable(index: int, name: str, message: str) -> InvalidArgument:
    shown = f"variables[{index}]" + (f" ({name!r})" if name else "")
    return InvalidArgument(f"{shown}: {message}", reason="FORMULA_INVALID",
                           metadata={"field": f"variables[{index}]", "variable": name})


def _variables(messages: list[pb.FormulaVariable]) -> dict[str, VariableValue]:
    """The request's variables for the compiler. Each name once, and value or per_currency
    (never both): either mistake would otherwise drop a value silently. A value that starts
    like a number (a digit, sign or point) is a decimal read by core.money.parse_decimal, so
    "1_000" is refused rather than read as 1000; any other value is text (a template name)."""
    if len(messages) > MAX_VARIABLES:
        # As a bonus definition's: the compiler's "did you mean" hint compares an unknown name
        # with every variable, and 2,500 of them held the event loop for 2.5 s.
        raise InvalidArgument(f"variables: at most {MAX_VARIABLES}, got {len(messages)}",
                              reason="INVALID_VARIABLE", metadata={"field": "variables"})
    found: dict[str, VariableValue] = {}
    for index, variable in enumerate(messages):
        field = f"variables[{index}]"
        if variable.name in found:
            raise _bad_variable(index, variable.name, "the name is given twice")
        if variable.per_currency:
            if variable.value:
                raise _bad_variable(index, variable.name,
                                    "give value or per_currency, not both")
            found[variable.name] = {
                code: parse_decimal(text, field=f"{field}.per_currency[{code}]",
                                    allow_negative=True) or Decimal(0)
                for code, text in variable.per_currency.items()}
        elif variable.value.strip()[:1] in _NUMBER_START:
            found[variable.name] = parse_decimal(variable.value, field=f"{field}.value",
                                                 allow_negative=True) or Decimal(0)
        else:
            found[variable.name] = variable.value
    return found


def _compile(source: str, variables: list[pb.FormulaVariable]) -> CompiledFormula:
    return compile_formula(source, variables=_variables(variables))


def period_from_pb(message: pb.TransactionPeriod) -> Period:
    """A TransactionPeriod message as the domain's Period (also used by the bonus service)."""
    which = message.WhichOneof("period")
    if which == "fixed":
        # With a zone the ends are wall-clock times there, so the 31-day limit counts local
        # days (a month across a DST change is 31 days); empty is UTC.
        zone: tzinfo = UTC
        if message.fixed.time_zone:
            zone = load_time_zone(message.fixed.time_zone, field="period.fixed.time_zone")
        start = read_timestamp(message.fixed.start, "period.fixed.start")
        end = read_timestamp(message.fixed.end, "period.fixed.end")
        try:
            return FixedPeriod(start.astimezone(zone), end.astimezone(zone))
        except OverflowError as exc:  # year 1 or 9999 shifted out of range by the zone
            raise InvalidArgument(
                "period.fixed falls outside the years 1..9999 in its time zone",
                reason="INVALID_PERIOD", metadata={"field": "period.fixed"}) from exc
    if which == "time_back":
        units = {pb.TIME_UNIT_HOURS: "hours", pb.TIME_UNIT_DAYS: "days"}
        if message.time_back.unit not in units:
            raise InvalidArgument("period.time_back.unit is required: TIME_UNIT_HOURS or "
                                  "TIME_UNIT_DAYS", reason="INVALID_PERIOD",
                                  metadata={"field": "period.time_back.unit"})
        return TimeBackPeriod(message.time_back.amount,
                              units[message.time_back.unit])  # type: ignore[arg-type]
    if which == "relative":
        kind = RELATIVE_FROM_PB.get(message.relative.kind)
        if kind is None:
            raise InvalidArgument("period.relative.kind is required", reason="INVALID_PERIOD",
                                  metadata={"field": "period.relative.kind"})
        return RelativePeriod(kind, message.relative.time_zone or None)
    raise InvalidArgument("period is required: this formula reads transactions",
                          reason="INVALID_PERIOD", metadata={"field": "period"})


class FormulaServicer(pb_grpc.FormulaServiceServicer):
    def __init__(self, deps: Dependencies) -> None:
        self._deps = deps

    async def ValidateFormula(self, request: pb.ValidateFormulaRequest,
                              context: aio.ServicerContext) -> pb.ValidateFormulaResponse:
        compiled = _compile(request.source, list(request.variables))
        return pb.ValidateFormulaResponse(
            language_version=FORMULA_LANGUAGE_VERSION,
            aggregates=[pb.AggregateDescription(key=a.key, description=a.describe())
                        for a in compiled.aggregates],
            properties_used=list(compiled.properties_used),
            variables_used=list(compiled.variables_used),
            returns_template=compiled.returns_template)

    async def DryRunFormula(self, request: pb.DryRunFormulaRequest,
                            context: aio.ServicerContext) -> pb.DryRunFormulaResponse:
        compiled = _compile(request.source, list(request.variables))
        rounding = ROUNDING_FROM_PB.get(request.rounding, "NONE")
        options = ResultOptions(
            rounding=RoundingMode[rounding],
            decimals=request.decimals if request.decimals or rounding != "NONE" else 2,
            factor=parse_decimal(request.rounding_factor, field="rounding_factor",
                                 allow_empty=True),
            cap_amount=parse_decimal(request.cap_amount, field="cap_amount", allow_empty=True),
            min_allowed=parse_decimal(request.min_allowed, field="min_allowed",
                                      allow_empty=True))
        required_id(request.customer_id, "customer_id")
        now = self._deps.clock.now()
        response = pb.DryRunFormulaResponse()
        async with self._deps.pool.acquire() as conn:
            customer = await customers_repo.get(conn, request.customer_id)
            found = {}
            if compiled.aggregates:
                window = resolve_period(period_from_pb(request.period), now=now,
                                        customer_time_zone=customer.time_zone)
                response.window_start.CopyFrom(timestamp(window.start))
                response.window_end.CopyFrom(timestamp(window.end))
                per_customer = await aggregates_repo.aggregate_for_customers(
                    conn, compiled.aggregates, [customer.customer_id], window.start, window.end)
                found = per_customer.get(customer.customer_id, {})
        evaluation = compiled.evaluate(
            FormulaInputs(aggregates=found, properties=dict(customer.properties),
                          currency=customer.currency), options)
        response.outcome = _OUTCOMES[evaluation.outcome]
        response.amount = format_decimal(evaluation.amount)
        response.template = evaluation.template or ""
        response.skip_reason = evaluation.skip_reason.name if evaluation.skip_reason else ""
        response.skip_detail = evaluation.skip_detail or ""
        # Scientific from 10^100 on (10^983045 was a 6 MB answer).
        response.raw_value = ("" if evaluation.raw_value is None
                              else shown_number(evaluation.raw_value))
        response.value_after_rounding = format_decimal(evaluation.value_after_rounding)
        response.value_after_cap = format_decimal(evaluation.value_after_cap)
        response.branch = evaluation.branch or ""
        response.explanation = evaluation.explain()
        for spec in compiled.aggregates:
            value = found.get(spec.key)
            response.aggregates.add(key=spec.key, description=spec.describe(),
                                    value=format_decimal(value.value) if value else "",
                                    count=value.count if value else 0)
        return response


def register(server: aio.Server, deps: Dependencies) -> None:
    pb_grpc.add_FormulaServiceServicer_to_server(FormulaServicer(deps), server)
