"""`promo bonuses`: dynamic bonus definitions, calculation requests, the approval queue (list,
show, approve, reject, recalculate), batches, a customer's ledger, and the automation rules and
schedules that request calculations (BonusService, docs/bonuses.md)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, tzinfo
from pathlib import Path
from typing import Annotated, Any

import typer
from google.protobuf.field_mask_pb2 import FieldMask
from google.protobuf.timestamp_pb2 import Timestamp
from rich.text import Text

from cli.client import (
    call,
    connection_callback,
    enum_name,
    enum_value,
    fail,
    load_json_file,
    pages,
    parse_message,
    print_json,
    request_id,
    to_dict,
)
from cli.commands.formulas import VarOpt, period_from_flags, variables_from_flags
from cli.options import AllOpt, JsonOpt, PageSizeOpt, PageTokenOpt, RequestIdOpt
from cli.output import console, show_message, show_rows
from core.errors import InvalidArgument
from core.periods import load_time_zone
from promo.v1 import bonuses_pb2 as pb
from promo.v1 import bonuses_pb2_grpc as pb_grpc
from promo.v1 import promotions_pb2 as ppb

app = typer.Typer(help="Dynamic bonuses: definitions, requests, the approval queue, batches, "
                       "ledgers, rules and schedules.", no_args_is_help=True,
                  callback=connection_callback)
rules_app = typer.Typer(help="Automation rules: request a calculation every N matching events.",
                        no_args_is_help=True)
schedules_app = typer.Typer(help="Schedules: request calculations at a local time.",
                            no_args_is_help=True)
app.add_typer(rules_app, name="rules")
app.add_typer(schedules_app, name="schedules")
STUB = pb_grpc.BonusServiceStub
RESULT_TYPE = "BONUS_RESULT_TYPE_"
STATUS = "BONUS_STATUS_"
WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


def _say(text: str) -> None:
    """One line of human output, printed as is (ids and product names may hold [brackets])."""
    console().print(text, markup=False, highlight=False)


def _table(title: str, columns: Sequence[str], rows: Iterable[Sequence[Any]],
           next_page_token: str = "") -> None:
    """show_rows with the text cells as plain Text (ids, filters and product names may hold
    [brackets], which rich would read as markup)."""
    show_rows(title, columns, ([Text(v) if isinstance(v, str) else v for v in row]
                               for row in rows), next_page_token)

FileOpt = Annotated[Path | None, typer.Option(
    "--file", "-f", exists=True, dir_okay=False, help="The message as proto JSON.")]
DefinitionOpt = Annotated[str, typer.Option("--definition", help="Bonus definition id.")]
UpdateFileOpt = Annotated[Path | None, typer.Option(
    "--file", "-f", exists=True, dir_okay=False,
    help="Proto JSON of the fields to change (its top-level keys are the update mask).")]
NewDefinitionOpt = Annotated[str | None, typer.Option("--definition",
                                                      help="Bonus definition id.")]


def _time(value: Timestamp, present: bool = True) -> str:
    return value.ToJsonString() if present else ""


def _timestamp(text: str, option: str, zone: tzinfo = UTC) -> Timestamp:
    """ISO 8601 (``2026-11-22``, ``2026-11-22T10:00``, ``...+01:00``); no offset means
    ``zone`` (UTC unless told)."""
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        fail(f"{option}: {text!r} is not an ISO 8601 date or time (e.g. 2026-11-22T10:00Z)")
    stamp = Timestamp()
    stamp.FromDatetime(when if when.tzinfo else when.replace(tzinfo=zone))
    return stamp


def _from_file(file: Path, message: Any, what: str) -> tuple[Any, list[str]]:
    """A message from a proto-JSON file, and the top-level fields it names (an update's mask)."""
    data = load_json_file(file)
    if not isinstance(data, dict):
        fail(f"{file}: expected a JSON object ({what})")
    parsed = parse_message(data, message, str(file))
    names = {f.json_name: f.name for f in message.DESCRIPTOR.fields}
    return parsed, [names.get(key, key) for key in data]


CLEAR = object()
"""An update flag given as "" for a message field: the field is in the mask and left unset."""


def _update_fields(file: Path | None, flags: dict[str, Any], message_type: Any,
                   what: str) -> tuple[Any, list[str]]:
    """An update command's message and mask: from --file (its top-level keys are the mask)
    or from the flags given (None: not given)."""
    given = {k: v for k, v in flags.items() if v is not None}
    if file is not None:
        if given:
            fail("give either --file or the fields' flags, not both")
        return _from_file(file, message_type(), what)
    if not given:
        fail("nothing to change: give the fields to update as flags or --file")
    return message_type(**{k: v for k, v in given.items() if v is not CLEAR}), list(given)


# --- definitions --------------------------------------------------------------------------------


def _show_definition(definition: pb.BonusDefinition, as_json: bool) -> None:
    if as_json:
        print_json(definition)
    else:
        show_message(definition, title=f"bonus definition {definition.definition_id}")


def _definition_flags(definition: pb.BonusDefinition, *, name: str | None, formula: str | None,
                      result_type: str | None, points_target: str | None,
                      min_allowed: str | None, cap_amount: str | None, rounding: str | None,
                      decimals: int | None, rounding_factor: str | None,
                      properties_only: bool | None, days: int | None, hours: int | None,
                      relative: str | None, time_zone: str, approval: str | None,
                      batch_window: int | None, messages: dict[str, str | None],
                      var: list[str] | None) -> list[str]:
    """Set the given flags on ``definition``; returns the fields set (an update's mask)."""
    paths: list[str] = []

    def put(path: str, value: Any) -> None:
        if value is not None:
            setattr(definition, path, value)
            paths.append(path)

    put("display_name", name)
    put("formula", formula)
    if var:
        definition.variables.extend(variables_from_flags(var))
        paths.append("variables")
    put("result_type", None if result_type is None else enum_value(
        pb.BonusResultType, RESULT_TYPE, result_type, "--result-type"))
    put("points_target", None if points_target is None else enum_value(
        pb.PointsTarget, "POINTS_TARGET_", points_target, "--points-target"))
    put("min_allowed", min_allowed)
    put("cap_amount", cap_amount)
    put("rounding", None if rounding is None else enum_value(
        ppb.RoundingMode, "ROUNDING_MODE_", rounding, "--rounding"))
    put("decimals", decimals)
    put("rounding_factor", rounding_factor)
    put("data_mode", None if properties_only is None else (
        pb.BONUS_DATA_MODE_PROPERTIES_ONLY if properties_only
        else pb.BONUS_DATA_MODE_TRANSACTIONS_AND_PROPERTIES))
    period = period_from_flags(days, hours, relative, time_zone)
    if period is not None:
        definition.period.CopyFrom(period)
        paths.append("period")
    put("approval_mode", None if approval is None else enum_value(
        pb.ApprovalMode, "APPROVAL_MODE_", approval, "--approval"))
    put("batch_window_seconds", batch_window)
    for path, text in messages.items():
        put(path, text)
    return paths


NameOpt = Annotated[str | None, typer.Option("--name", help="Display name.")]
FormulaOpt = Annotated[str | None, typer.Option(help="The formula (docs/formulas.md).")]
ResultTypeOpt = Annotated[str | None, typer.Option(
    help="amount (default), bonus_template, points, gems or diamonds.")]
PointsTargetOpt = Annotated[str | None, typer.Option(
    help="POINTS: balance, leaderboard or level_progress.")]
MinOpt = Annotated[str | None, typer.Option("--min", help="Smallest amount issued.")]
CapOpt = Annotated[str | None, typer.Option("--cap", help="Largest amount issued.")]
RoundingOpt = Annotated[str | None, typer.Option(
    help="none, round, round_up, round_down or mround.")]
DecimalsOpt = Annotated[int | None, typer.Option(min=0, max=6)]  # amounts keep 6 places
FactorOpt = Annotated[str | None, typer.Option(help="Factor of mround.")]
PropertiesOnlyOpt = Annotated[bool | None, typer.Option(
    "--properties-only/--transactions", help="Read customer properties only (no period).")]
DaysOpt = Annotated[int | None, typer.Option(help="Period: the last N days.")]
HoursOpt = Annotated[int | None, typer.Option(help="Period: the last N hours.")]
RelativeOpt = Annotated[str | None, typer.Option(
    help="Period: last_full_day, last_full_week, last_full_month, last_weekend, today_so_far.")]
ZoneOpt = Annotated[str, typer.Option(
    help="Zone of --relative (default: each customer's own).")]
ApprovalOpt = Annotated[str | None, typer.Option(help="automatic (default) or manual.")]
WindowOpt = Annotated[int | None, typer.Option(
    "--batch-window", min=0, help="Batching window in seconds (0: the deployment's).")]
MessageOpt = Annotated[str | None, typer.Option(help="Message template of the event.")]


@app.command()
def create(
    ctx: typer.Context,
    definition_id: Annotated[str | None, typer.Argument(
        help="Definition id (a-z 0-9 _ . -).", show_default=False)] = None,
    file: FileOpt = None,
    name: NameOpt = None,
    formula: FormulaOpt = None,
    result_type: ResultTypeOpt = None,
    points_target: PointsTargetOpt = None,
    min_allowed: MinOpt = None,
    cap_amount: CapOpt = None,
    rounding: RoundingOpt = None,
    decimals: DecimalsOpt = None,
    rounding_factor: FactorOpt = None,
    properties_only: PropertiesOnlyOpt = None,
    days: DaysOpt = None,
    hours: HoursOpt = None,
    relative: RelativeOpt = None,
    time_zone: ZoneOpt = "",
    approval: ApprovalOpt = None,
    batch_window: WindowOpt = None,
    skipped_message: MessageOpt = None,
    calculated_message: MessageOpt = None,
    issued_message: MessageOpt = None,
    var: VarOpt = None,
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Define a dynamic bonus from flags, or from a JSON file (a BonusDefinition)."""
    definition = pb.BonusDefinition()
    if file is not None:
        if var or any(v is not None for v in (
                name, formula, result_type, points_target, min_allowed, cap_amount, rounding,
                decimals, rounding_factor, properties_only, days, hours, relative, approval,
                batch_window, skipped_message, calculated_message, issued_message)):
            fail("give either --file or the definition's flags, not both")
        definition, _ = _from_file(file, definition, "a BonusDefinition")
        if definition_id:
            definition.definition_id = definition_id
    else:
        if not definition_id or formula is None:
            fail("give DEFINITION_ID and --formula, or --file with the definition as JSON")
        definition.definition_id = definition_id
        _definition_flags(
            definition, name=name if name is not None else definition_id, formula=formula,
            result_type=result_type or "amount", points_target=points_target,
            min_allowed=min_allowed, cap_amount=cap_amount, rounding=rounding,
            decimals=decimals, rounding_factor=rounding_factor,
            properties_only=bool(properties_only), days=days, hours=hours, relative=relative,
            time_zone=time_zone, approval=approval or "automatic", batch_window=batch_window,
            messages={"skipped_message": skipped_message,
                      "calculated_message": calculated_message,
                      "issued_message": issued_message}, var=var)
    response = call(ctx, STUB, "CreateBonusDefinition", pb.CreateBonusDefinitionRequest(
        request_id=request_id(request), definition=definition))
    _show_definition(response.definition, as_json)


@app.command()
def get(ctx: typer.Context, definition_id: str, as_json: JsonOpt = False) -> None:
    """Show a bonus definition."""
    response = call(ctx, STUB, "GetBonusDefinition",
                    pb.GetBonusDefinitionRequest(definition_id=definition_id))
    _show_definition(response.definition, as_json)


@app.command("list")
def list_(ctx: typer.Context, page_size: PageSizeOpt = 50, page_token: PageTokenOpt = "",
          all_pages: AllOpt = False, as_json: JsonOpt = False) -> None:
    """Bonus definitions by id."""
    request = pb.ListBonusDefinitionsRequest(page_size=page_size, page_token=page_token)
    items: list[pb.BonusDefinition] = []
    token = ""
    for page in pages(ctx, STUB, "ListBonusDefinitions", request, follow=all_pages):
        items.extend(page.definitions)
        token = page.next_page_token
    if as_json:
        print_json({"definitions": [to_dict(d) for d in items], "next_page_token": token})
        return
    _table("Bonus definitions", ["id", "name", "result", "approval", "formula", "revision"],
              ([d.definition_id, d.display_name,
                enum_name(pb.BonusResultType, RESULT_TYPE, d.result_type).lower(),
                enum_name(pb.ApprovalMode, "APPROVAL_MODE_", d.approval_mode).lower(),
                d.formula, d.revision] for d in items), token)


@app.command()
def update(
    ctx: typer.Context,
    definition_id: str,
    file: Annotated[Path | None, typer.Option(
        "--file", "-f", exists=True, dir_okay=False,
        help="Proto JSON of the fields to change (its top-level keys are the update mask).")]
        = None,
    name: NameOpt = None,
    formula: FormulaOpt = None,
    result_type: ResultTypeOpt = None,
    points_target: PointsTargetOpt = None,
    min_allowed: MinOpt = None,
    cap_amount: CapOpt = None,
    rounding: RoundingOpt = None,
    decimals: DecimalsOpt = None,
    rounding_factor: FactorOpt = None,
    properties_only: PropertiesOnlyOpt = None,
    days: DaysOpt = None,
    hours: HoursOpt = None,
    relative: RelativeOpt = None,
    time_zone: ZoneOpt = "",
    approval: ApprovalOpt = None,
    batch_window: WindowOpt = None,
    skipped_message: MessageOpt = None,
    calculated_message: MessageOpt = None,
    issued_message: MessageOpt = None,
    var: VarOpt = None,
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change the given fields of a definition (an empty --min or --cap removes it; --var
    replaces all the variables)."""
    definition = pb.BonusDefinition()
    if file is not None:
        if var or any(v is not None for v in (
                name, formula, result_type, points_target, min_allowed, cap_amount, rounding,
                decimals, rounding_factor, properties_only, days, hours, relative, approval,
                batch_window, skipped_message, calculated_message, issued_message)):
            fail("give either --file or the fields' flags, not both")
        definition, paths = _from_file(file, definition, "BonusDefinition fields")
    else:
        paths = _definition_flags(
            definition, name=name, formula=formula, result_type=result_type,
            points_target=points_target, min_allowed=min_allowed, cap_amount=cap_amount,
            rounding=rounding, decimals=decimals, rounding_factor=rounding_factor,
            properties_only=properties_only, days=days, hours=hours, relative=relative,
            time_zone=time_zone, approval=approval, batch_window=batch_window,
            messages={"skipped_message": skipped_message,
                      "calculated_message": calculated_message,
                      "issued_message": issued_message}, var=var)
    if not paths:
        fail("nothing to change: give the fields to update as flags or --file")
    definition.definition_id = definition_id
    response = call(ctx, STUB, "UpdateBonusDefinition", pb.UpdateBonusDefinitionRequest(
        request_id=request_id(request), definition=definition,
        update_mask=FieldMask(paths=paths)))
    _show_definition(response.definition, as_json)


# --- requests -----------------------------------------------------------------------------------


def _read_ids(file: Path) -> list[str]:
    """Customer ids, one a line (the first column of a CSV; a `customer_id` header is skipped)."""
    try:
        lines = file.read_text(encoding="utf-8-sig").splitlines()  # a spreadsheet's BOM
    except (OSError, UnicodeDecodeError) as exc:
        fail(f"cannot read {file}: {exc}")
    ids = [line.split(",")[0].strip() for line in lines]
    return [i for n, i in enumerate(ids) if i and not (n == 0 and i == "customer_id")]


@app.command("request")
def request_(
    ctx: typer.Context,
    definition_id: str,
    customer: Annotated[list[str] | None, typer.Argument(
        help="Customer ids.", show_default=False)] = None,
    file: Annotated[Path | None, typer.Option(
        "--customers-file", exists=True, dir_okay=False,
        help="Customer ids, one a line (or the first column of a CSV).")] = None,
    period_start: Annotated[str | None, typer.Option(
        help="Read transactions from this time (ISO 8601) instead of the definition's "
             "period.")] = None,
    period_end: Annotated[str | None, typer.Option(help="...until this time.")] = None,
    time_zone: Annotated[str | None, typer.Option(
        help="IANA zone of the period: times without an offset are read in it, and the 31-day "
             "limit is measured on its clock (1 Oct - 1 Nov Europe/Berlin is 31 days).")] = None,
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Ask for a calculation for customers; it runs when its batching window closes."""
    ids = list(customer or []) + (_read_ids(file) if file is not None else [])
    message = pb.RequestBonusCalculationRequest(
        request_id=request_id(request), definition_id=definition_id, customer_ids=ids,
        time_zone=time_zone or "")
    zone: tzinfo = UTC
    if time_zone:
        try:
            zone = load_time_zone(time_zone, field="--time-zone")
        except InvalidArgument as exc:
            fail(str(exc))
    if period_start is not None:
        message.period_start.CopyFrom(_timestamp(period_start, "--period-start", zone))
    if period_end is not None:
        message.period_end.CopyFrom(_timestamp(period_end, "--period-end", zone))
    response = call(ctx, STUB, "RequestBonusCalculation", message)
    if as_json:
        print_json(response)
        return
    _say(f"accepted {response.accepted_count} customer(s) in the window of "
                    f"{_time(response.window_start)}; the batch runs at "
                    f"{_time(response.due_time)}")


# --- the approval queue -------------------------------------------------------------------------


def _outcome(result: pb.BonusResult) -> str:
    if result.status == pb.BONUS_STATUS_SKIPPED:
        return f"skipped: {result.skip_reason}"
    if result.template:
        return result.template
    target = ""
    if result.result_type == pb.BONUS_RESULT_TYPE_POINTS:
        target = " to " + enum_name(pb.PointsTarget, "POINTS_TARGET_",
                                    result.points_target).lower()
    unit = {pb.BONUS_RESULT_TYPE_AMOUNT: result.currency}.get(
        result.result_type, enum_name(pb.BonusResultType, RESULT_TYPE, result.result_type)
        .lower())
    return f"{result.amount} {unit}".rstrip() + target


def _status(result: pb.BonusResult) -> str:
    return enum_name(pb.BonusStatus, STATUS, result.status).lower()


def _results_table(title: str, results: list[pb.BonusResult], token: str = "") -> None:
    _table(title, ["bonus id", "definition", "customer", "status", "result", "source",
                      "calculated"],
              ([r.bonus_id, r.definition_id, r.customer_id, _status(r), _outcome(r), r.source,
                _time(r.calculate_time, r.HasField("calculate_time"))] for r in results),
              token)


@app.command()
def queue(
    ctx: typer.Context,
    definition: Annotated[str, typer.Option("--definition", help="Only this definition.")]
        = "",
    status: Annotated[list[str] | None, typer.Option(
        "--status", help="skipped, calculated, issued or rejected (repeat for several).")]
        = None,
    customer: Annotated[str, typer.Option("--customer", help="Only this customer.")] = "",
    after: Annotated[str | None, typer.Option(
        "--after", help="Calculated at or after this time (ISO 8601).")] = None,
    before: Annotated[str | None, typer.Option(
        "--before", help="Calculated before this time (ISO 8601).")] = None,
    page_size: PageSizeOpt = 50,
    page_token: PageTokenOpt = "",
    all_pages: AllOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Bonus results, newest first (--status calculated: what waits for approval)."""
    request = pb.ListBonusResultsRequest(
        page_size=page_size, page_token=page_token, definition_id=definition,
        customer_id=customer,
        statuses=[enum_value(pb.BonusStatus, STATUS, s, "--status") for s in status or []])
    if after is not None:
        request.calculated_after.CopyFrom(_timestamp(after, "--after"))
    if before is not None:
        request.calculated_before.CopyFrom(_timestamp(before, "--before"))
    items: list[pb.BonusResult] = []
    token = ""
    for page in pages(ctx, STUB, "ListBonusResults", request, follow=all_pages):
        items.extend(page.results)
        token = page.next_page_token
    if as_json:
        print_json({"results": [to_dict(r) for r in items], "next_page_token": token})
        return
    _results_table("Bonus results", items, token)


@app.command()
def show(ctx: typer.Context, bonus_id: str, as_json: JsonOpt = False) -> None:
    """One result: its aggregates, the explanation, and the customer's events behind it."""
    response = call(ctx, STUB, "GetBonusResult", pb.GetBonusResultRequest(bonus_id=bonus_id))
    if as_json:
        print_json(response)
        return
    result = response.result
    _say(f"bonus {result.bonus_id}: {_status(result)}, {_outcome(result)}")
    show_message(result, skip=("aggregates", "explanation"))
    if result.aggregates:
        _table("Aggregates", ["key", "description", "value", "count"],
                  ([a.key, a.description, a.value, a.count] for a in result.aggregates))
    if result.explanation:
        _say(result.explanation)
    if response.events:
        _table("Events", ["event id", "kind", "amount", "currency", "occurred at",
                             "attributes"],
                  ([e.event_id, e.kind, e.amount, e.currency, _time(e.occurred_at),
                    dict(e.attributes)] for e in response.events))


def _decided(verb: str, results: list[pb.BonusResult], as_json: bool) -> None:
    if as_json:
        print_json({"results": [to_dict(r) for r in results]})
        return
    _say(f"{verb} {len(results)} result(s)")
    _results_table("Bonus results", results)


@app.command()
def approve(ctx: typer.Context,
            bonus_ids: Annotated[list[str], typer.Argument(help="1 to 1,000 bonus ids.")],
            request: RequestIdOpt = None, as_json: JsonOpt = False) -> None:
    """Issue CALCULATED results (all or none): ledger entries and Issued events."""
    response = call(ctx, STUB, "ApproveBonusResults", pb.ApproveBonusResultsRequest(
        request_id=request_id(request), bonus_ids=bonus_ids))
    _decided("approved", list(response.results), as_json)


@app.command()
def reject(ctx: typer.Context,
           bonus_ids: Annotated[list[str], typer.Argument(help="1 to 1,000 bonus ids.")],
           reason: Annotated[str, typer.Option(help="Why (kept with each result).")] = "",
           request: RequestIdOpt = None, as_json: JsonOpt = False) -> None:
    """Reject CALCULATED results (all or none)."""
    response = call(ctx, STUB, "RejectBonusResults", pb.RejectBonusResultsRequest(
        request_id=request_id(request), bonus_ids=bonus_ids, reason=reason))
    _decided("rejected", list(response.results), as_json)


@app.command()
def recalculate(ctx: typer.Context, definition_id: str, request: RequestIdOpt = None,
                as_json: JsonOpt = False) -> None:
    """Compute every SKIPPED and CALCULATED result of a definition again, after an edit."""
    response = call(ctx, STUB, "RecalculateBonusResults", pb.RecalculateBonusResultsRequest(
        request_id=request_id(request), definition_id=definition_id))
    if as_json:
        print_json(response)
        return
    _say(f"recalculated {response.recalculated_count}: "
                    f"{response.calculated_count} calculated, {response.skipped_count} skipped")


# --- batches and ledger -------------------------------------------------------------------------


@app.command()
def batches(ctx: typer.Context,
            definition: Annotated[str, typer.Option("--definition",
                                                    help="Only this definition.")] = "",
            page_size: PageSizeOpt = 50, page_token: PageTokenOpt = "",
            all_pages: AllOpt = False, as_json: JsonOpt = False) -> None:
    """What each batch cost: requests, customers, events read, duration."""
    request = pb.ListBonusBatchesRequest(page_size=page_size, page_token=page_token,
                                         definition_id=definition)
    items: list[pb.BonusBatch] = []
    token = ""
    for page in pages(ctx, STUB, "ListBonusBatches", request, follow=all_pages):
        items.extend(page.batches)
        token = page.next_page_token
    if as_json:
        print_json({"batches": [to_dict(b) for b in items], "next_page_token": token})
        return
    _table("Bonus batches", ["batch", "definition", "window", "requests", "customers",
                                "events read", "duration ms", "finished"],
              ([b.batch_id, b.definition_id,
                f"{_time(b.window_start)} - {_time(b.window_end)}", b.request_count,
                b.customer_count, b.events_read, b.duration_ms,
                _time(b.finish_time, b.HasField("finish_time"))] for b in items), token)


@app.command()
def ledger(ctx: typer.Context, customer_id: str, page_size: PageSizeOpt = 50,
           page_token: PageTokenOpt = "", all_pages: AllOpt = False,
           as_json: JsonOpt = False) -> None:
    """A customer's issued dynamic rewards (source DYNAMIC_FORMULA)."""
    request = pb.ListCustomerBonusLedgerRequest(customer_id=customer_id, page_size=page_size,
                                                page_token=page_token)
    items: list[pb.LedgerEntry] = []
    token = ""
    for page in pages(ctx, STUB, "ListCustomerBonusLedger", request, follow=all_pages):
        items.extend(page.entries)
        token = page.next_page_token
    if as_json:
        print_json({"entries": [to_dict(e) for e in items], "next_page_token": token})
        return
    _table(f"Ledger of {customer_id}", ["entry", "bonus id", "definition", "type",
                                           "amount", "source", "issued"],
              ([e.entry_id, e.bonus_id, e.definition_id,
                enum_name(pb.BonusResultType, RESULT_TYPE, e.result_type).lower(),
                e.template or e.amount, e.source, _time(e.issue_time)] for e in items), token)


# --- rules --------------------------------------------------------------------------------------


def _show_rule(rule: pb.BonusRule, as_json: bool) -> None:
    if as_json:
        print_json(rule)
    else:
        show_message(rule, title=f"bonus rule {rule.rule_id}")


@rules_app.command("create")
def rule_create(
    ctx: typer.Context,
    rule_id: Annotated[str | None, typer.Argument(help="Rule id (a-z 0-9 _ . -).",
                                                  show_default=False)] = None,
    file: FileOpt = None,
    definition: Annotated[str | None, typer.Option("--definition",
                                                   help="Bonus definition id.")] = None,
    event_kind: Annotated[str | None, typer.Option(help="Count events of this kind.")] = None,
    filter_: Annotated[str, typer.Option(
        "--filter", help='Only events matching this, e.g. game = "Gold Quest".')] = "",
    every: Annotated[int, typer.Option(min=1, help="Fire every N matching events.")] = 1,
    qualification_kind: Annotated[str, typer.Option(
        help="An event of this kind must come first.")] = "",
    qualification_min_amount: Annotated[str, typer.Option(
        help="...with at least this amount.")] = "",
    qualification_currency: Annotated[str, typer.Option(
        help="...in this currency (ISO 4217; default: the customer's own).")] = "",
    qualification_filter: Annotated[str, typer.Option(help="...matching this.")] = "",
    max_executions: Annotated[int, typer.Option(
        min=0, help="With a qualification: fire at most N times per qualification.")] = 0,
    period_mode: Annotated[str, typer.Option(
        help="definition, first_to_last, qualification_to_last, first_to_fixed_end or "
             "qualification_to_fixed_end.")] = "definition",
    period_end: Annotated[str | None, typer.Option(
        help="End of the *_to_fixed_end periods (ISO 8601).")] = None,
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create an automation rule from flags, or from a JSON file (a BonusRule)."""
    if file is not None:
        rule, _ = _from_file(file, pb.BonusRule(), "a BonusRule")
        if rule_id:
            rule.rule_id = rule_id
    else:
        if not rule_id or not definition or not event_kind:
            fail("give RULE_ID, --definition and --event-kind, or --file with the rule as JSON")
        rule = pb.BonusRule(
            rule_id=rule_id, definition_id=definition, event_kind=event_kind, filter=filter_,
            every=every, qualification_kind=qualification_kind,
            qualification_min_amount=qualification_min_amount,
            qualification_currency=qualification_currency,
            qualification_filter=qualification_filter, max_executions=max_executions,
            period_mode=enum_value(pb.RulePeriodMode, "RULE_PERIOD_MODE_",  # type: ignore[arg-type]
                                   period_mode, "--period-mode"))
        if period_end is not None:
            rule.period_end.CopyFrom(_timestamp(period_end, "--period-end"))
    response = call(ctx, STUB, "CreateBonusRule", pb.CreateBonusRuleRequest(
        request_id=request_id(request), rule=rule))
    _show_rule(response.rule, as_json)


@rules_app.command("get")
def rule_get(ctx: typer.Context, rule_id: str, as_json: JsonOpt = False) -> None:
    """Show an automation rule."""
    _show_rule(call(ctx, STUB, "GetBonusRule", pb.GetBonusRuleRequest(rule_id=rule_id)).rule,
               as_json)


@rules_app.command("list")
def rule_list(ctx: typer.Context, page_size: PageSizeOpt = 50, page_token: PageTokenOpt = "",
              all_pages: AllOpt = False, as_json: JsonOpt = False) -> None:
    """Automation rules by id."""
    request = pb.ListBonusRulesRequest(page_size=page_size, page_token=page_token)
    items: list[pb.BonusRule] = []
    token = ""
    for page in pages(ctx, STUB, "ListBonusRules", request, follow=all_pages):
        items.extend(page.rules)
        token = page.next_page_token
    if as_json:
        print_json({"rules": [to_dict(r) for r in items], "next_page_token": token})
        return
    _table("Bonus rules", ["id", "definition", "counts", "every", "qualification", "period",
                              "active"],
              ([r.rule_id, r.definition_id,
                r.event_kind + (f" where {r.filter}" if r.filter else ""), r.every,
                " ".join(p for p in (r.qualification_kind, r.qualification_min_amount and
                                     f">= {r.qualification_min_amount}",
                                     r.qualification_currency) if p),
                enum_name(pb.RulePeriodMode, "RULE_PERIOD_MODE_", r.period_mode).lower(),
                r.active] for r in items), token)


def _set_rule_active(ctx: typer.Context, rule_id: str, active: bool, request: str | None,
                     as_json: bool) -> None:
    response = call(ctx, STUB, "UpdateBonusRule", pb.UpdateBonusRuleRequest(
        request_id=request_id(request), rule=pb.BonusRule(rule_id=rule_id, active=active),
        update_mask=FieldMask(paths=["active"])))
    if as_json:
        print_json(response.rule)
    else:
        _say(f"rule {rule_id} {'resumed' if active else 'paused'}")


@rules_app.command("pause")
def rule_pause(ctx: typer.Context, rule_id: str, request: RequestIdOpt = None,
               as_json: JsonOpt = False) -> None:
    """Stop a rule from counting events and firing."""
    _set_rule_active(ctx, rule_id, False, request, as_json)


@rules_app.command("resume")
def rule_resume(ctx: typer.Context, rule_id: str, request: RequestIdOpt = None,
                as_json: JsonOpt = False) -> None:
    """Let a paused rule count and fire again."""
    _set_rule_active(ctx, rule_id, True, request, as_json)


@rules_app.command("update")
def rule_update(
    ctx: typer.Context,
    rule_id: str,
    file: UpdateFileOpt = None,
    definition: NewDefinitionOpt = None,
    event_kind: Annotated[str | None, typer.Option(help="Count events of this kind.")] = None,
    filter_: Annotated[str | None, typer.Option(
        "--filter", help='Only events matching this ("" for all).')] = None,
    every: Annotated[int | None, typer.Option(min=1, help="Fire every N matching events.")]
        = None,
    qualification_kind: Annotated[str | None, typer.Option(
        help='An event of this kind must come first ("" for none).')] = None,
    qualification_min_amount: Annotated[str | None, typer.Option(
        help="...with at least this amount.")] = None,
    qualification_currency: Annotated[str | None, typer.Option(
        help='...in this currency (ISO 4217; "" for the customer\'s own).')] = None,
    qualification_filter: Annotated[str | None, typer.Option(help="...matching this.")] = None,
    max_executions: Annotated[int | None, typer.Option(
        min=0, help="Fire at most N times per qualification (0: no limit).")] = None,
    period_mode: Annotated[str | None, typer.Option(
        help="definition, first_to_last, qualification_to_last, first_to_fixed_end or "
             "qualification_to_fixed_end.")] = None,
    period_end: Annotated[str | None, typer.Option(
        help='End of the *_to_fixed_end periods (ISO 8601; "" removes it).')] = None,
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change the given fields of a rule (the update mask is the flags given, or the file's
    keys). A new --event-kind, --filter or --every starts every customer's count again."""
    flags: dict[str, Any] = {
        "definition_id": definition, "event_kind": event_kind, "filter": filter_,
        "every": every, "qualification_kind": qualification_kind,
        "qualification_min_amount": qualification_min_amount,
        "qualification_currency": qualification_currency,
        "qualification_filter": qualification_filter, "max_executions": max_executions,
        "period_mode": None if period_mode is None else enum_value(
            pb.RulePeriodMode, "RULE_PERIOD_MODE_", period_mode, "--period-mode")}
    if period_end is not None:
        flags["period_end"] = _timestamp(period_end, "--period-end") if period_end else CLEAR
    rule, paths = _update_fields(file, flags, pb.BonusRule, "BonusRule fields")
    rule.rule_id = rule_id
    response = call(ctx, STUB, "UpdateBonusRule", pb.UpdateBonusRuleRequest(
        request_id=request_id(request), rule=rule, update_mask=FieldMask(paths=paths)))
    _show_rule(response.rule, as_json)


# --- schedules ----------------------------------------------------------------------------------


def _weekday(text: str) -> int:
    if text.isdigit() and 0 <= int(text) <= 7:
        return int(text)
    short = text.lower()[:3]
    if short in WEEKDAYS:
        return WEEKDAYS.index(short) + 1
    fail(f"--weekday takes mon..sun, 1..7 (1 = Monday) or 0 (every day), got {text!r}")


def _show_schedule(schedule: pb.BonusSchedule, as_json: bool) -> None:
    if as_json:
        print_json(schedule)
    else:
        show_message(schedule, title=f"bonus schedule {schedule.schedule_id}")


@schedules_app.command("create")
def schedule_create(
    ctx: typer.Context,
    schedule_id: Annotated[str | None, typer.Argument(help="Schedule id.",
                                                      show_default=False)] = None,
    file: FileOpt = None,
    definition: Annotated[str | None, typer.Option("--definition",
                                                   help="Bonus definition id.")] = None,
    customer: Annotated[list[str] | None, typer.Option(
        "--customer", help="A customer to request for (repeat).")] = None,
    customers_file: Annotated[Path | None, typer.Option(
        "--customers-file", exists=True, dir_okay=False,
        help="Customer ids, one a line (or the first column of a CSV).")] = None,
    campaign: Annotated[str, typer.Option(
        "--campaign", help="Instead of customers: the campaign's target group at each run.")]
        = "",
    since_campaign_entrance: Annotated[bool, typer.Option(
        "--since-campaign-entrance", help="With --campaign: read events from the campaign's "
                                          "execution until the run.")] = False,
    weekday: Annotated[str, typer.Option(
        help="mon..sun or 1..7; 0 or every: every day.")] = "0",
    at: Annotated[str | None, typer.Option("--at", help="Local time HH:MM.")] = None,
    time_zone: Annotated[str, typer.Option(help="IANA zone of --at.")] = "UTC",
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a schedule from flags, or from a JSON file (a BonusSchedule)."""
    if file is not None:
        schedule, _ = _from_file(file, pb.BonusSchedule(), "a BonusSchedule")
        if schedule_id:
            schedule.schedule_id = schedule_id
    else:
        if not schedule_id or not definition or not at:
            fail("give SCHEDULE_ID, --definition and --at, or --file with the schedule as JSON")
        ids = list(customer or []) + (_read_ids(customers_file) if customers_file else [])
        schedule = pb.BonusSchedule(
            schedule_id=schedule_id, definition_id=definition, customer_ids=ids,
            campaign_id=campaign, since_campaign_entrance=since_campaign_entrance,
            weekday=0 if weekday.lower() == "every" else _weekday(weekday), local_time=at,
            time_zone=time_zone)
    response = call(ctx, STUB, "CreateBonusSchedule", pb.CreateBonusScheduleRequest(
        request_id=request_id(request), schedule=schedule))
    _show_schedule(response.schedule, as_json)


@schedules_app.command("get")
def schedule_get(ctx: typer.Context, schedule_id: str, as_json: JsonOpt = False) -> None:
    """Show a schedule."""
    _show_schedule(call(ctx, STUB, "GetBonusSchedule",
                        pb.GetBonusScheduleRequest(schedule_id=schedule_id)).schedule, as_json)


@schedules_app.command("list")
def schedule_list(ctx: typer.Context, page_size: PageSizeOpt = 50,
                  page_token: PageTokenOpt = "", all_pages: AllOpt = False,
                  as_json: JsonOpt = False) -> None:
    """Schedules by id, with their next run."""
    request = pb.ListBonusSchedulesRequest(page_size=page_size, page_token=page_token)
    items: list[pb.BonusSchedule] = []
    token = ""
    for page in pages(ctx, STUB, "ListBonusSchedules", request, follow=all_pages):
        items.extend(page.schedules)
        token = page.next_page_token
    if as_json:
        print_json({"schedules": [to_dict(s) for s in items], "next_page_token": token})
        return
    _table("Bonus schedules", ["id", "definition", "for", "when", "next run", "last run",
                                  "active"],
              ([s.schedule_id, s.definition_id,
                f"campaign {s.campaign_id}" if s.campaign_id
                else f"{len(s.customer_ids)} customer(s)",
                f"{WEEKDAYS[s.weekday - 1] if s.weekday else 'daily'} {s.local_time} "
                f"{s.time_zone}",
                _time(s.next_run_time, s.HasField("next_run_time")),
                _time(s.last_run_time, s.HasField("last_run_time")), s.active]
               for s in items), token)


def _set_schedule_active(ctx: typer.Context, schedule_id: str, active: bool,
                         request: str | None, as_json: bool) -> None:
    response = call(ctx, STUB, "UpdateBonusSchedule", pb.UpdateBonusScheduleRequest(
        request_id=request_id(request),
        schedule=pb.BonusSchedule(schedule_id=schedule_id, active=active),
        update_mask=FieldMask(paths=["active"])))
    if as_json:
        print_json(response.schedule)
        return
    schedule = response.schedule
    state = "resumed" if active else "paused"
    after = f", next run {_time(schedule.next_run_time)}" if active and schedule.HasField(
        "next_run_time") else ""
    _say(f"schedule {schedule_id} {state}{after}")


@schedules_app.command("pause")
def schedule_pause(ctx: typer.Context, schedule_id: str, request: RequestIdOpt = None,
                   as_json: JsonOpt = False) -> None:
    """Stop a schedule from running."""
    _set_schedule_active(ctx, schedule_id, False, request, as_json)


@schedules_app.command("resume")
def schedule_resume(ctx: typer.Context, schedule_id: str, request: RequestIdOpt = None,
                    as_json: JsonOpt = False) -> None:
    """Run a paused schedule again from its next time (no catching up)."""
    _set_schedule_active(ctx, schedule_id, True, request, as_json)


@schedules_app.command("update")
def schedule_update(
    ctx: typer.Context,
    schedule_id: str,
    file: UpdateFileOpt = None,
    definition: NewDefinitionOpt = None,
    customer: Annotated[list[str] | None, typer.Option(
        "--customer", help="The customers to request for, replacing the list (repeat).")]
        = None,
    customers_file: Annotated[Path | None, typer.Option(
        "--customers-file", exists=True, dir_okay=False,
        help="Customer ids, one a line (or the first column of a CSV).")] = None,
    campaign: Annotated[str | None, typer.Option(
        "--campaign", help='The campaign\'s target group instead ("" for none).')] = None,
    since_campaign_entrance: Annotated[bool | None, typer.Option(
        "--since-campaign-entrance/--definition-period",
        help="With --campaign: read events from the campaign's execution until the run, or "
             "the definition's period.")] = None,
    weekday: Annotated[str | None, typer.Option(
        help="mon..sun or 1..7; 0 or every: every day.")] = None,
    at: Annotated[str | None, typer.Option("--at", help="Local time HH:MM.")] = None,
    time_zone: Annotated[str | None, typer.Option(help="IANA zone of --at.")] = None,
    request: RequestIdOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change the given fields of a schedule (the update mask is the flags given, or the
    file's keys). A new --weekday, --at or --time-zone moves the next run; the rest applies
    to the next run."""
    ids = None
    if customer is not None or customers_file is not None:
        ids = list(customer or []) + (_read_ids(customers_file) if customers_file else [])
    flags: dict[str, Any] = {
        "definition_id": definition, "customer_ids": ids, "campaign_id": campaign,
        "since_campaign_entrance": since_campaign_entrance,
        "weekday": None if weekday is None else (
            0 if weekday.lower() == "every" else _weekday(weekday)),
        "local_time": at, "time_zone": time_zone}
    schedule, paths = _update_fields(file, flags, pb.BonusSchedule, "BonusSchedule fields")
    schedule.schedule_id = schedule_id
    response = call(ctx, STUB, "UpdateBonusSchedule", pb.UpdateBonusScheduleRequest(
        request_id=request_id(request), schedule=schedule, update_mask=FieldMask(paths=paths)))
    _show_schedule(response.schedule, as_json)
